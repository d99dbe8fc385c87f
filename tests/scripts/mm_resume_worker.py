"""The second half of tests/mm/test_mm_production.py's resume test, in a fresh process: mmengine's Runner
resumes the small detector run with DyRepHook and an EMAHook from ``WORK/iter_3.pth`` (``resume=True``) and
trains to iteration 6, writing ``WORK/iter_6.pth`` as the uninterrupted run does.

    python tests/scripts/mm_resume_worker.py --data DEEPFOREST_COCO --work WORK --out OUT

The test starts it without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``: DyRepHook must scope the unsafe loading
mmengine 0.10.7 needs under torch >= 2.6 itself. ``OUT`` records that the variable was unset before and after,
that torch's default loading refuses the checkpoint, and the losses of the resumed iterations and the
saliency each of its DyRep steps used.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.launch import UNSAFE_LOAD_FLAG  # noqa: E402
from helpers.mm_production import (  # noqa: E402
    RESUME_HALF,
    RESUME_ITERS,
    dyrep_probes,
    resume_cfg,
    train_runner,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = Path(args.work) / f"iter_{RESUME_HALF}.pth"
    result = {"flag_before": os.environ.get(UNSAFE_LOAD_FLAG)}
    try:
        torch.load(checkpoint, map_location="cpu")
        result["default_load_refused"] = False
    except pickle.UnpicklingError:
        result["default_load_refused"] = True

    cfg = resume_cfg(Path(args.data), Path(args.work), RESUME_ITERS)
    cfg.resume, cfg.load_from = True, str(checkpoint)
    record, *probes = dyrep_probes()
    runner = train_runner(cfg, *probes)
    result.update(flag_after=os.environ.get(UNSAFE_LOAD_FLAG), iter=runner.iter,
                  losses=record["losses"], saliency=record["saliency"])
    torch.save(result, args.out)


if __name__ == "__main__":
    main()
