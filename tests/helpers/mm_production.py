"""Pieces of the production-run tests of DyRepHook (``tests/mm/test_mm_production.py`` and its worker
scripts): the small detector run, a probe around the hook's steps, and mmengine's AmpOptimWrapper on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from dyrep_fx.mm.inputs import side_loader
from dyrep_fx.mm.wrappers import unwrap

from .mm_data import DEEPFOREST_ENV, find_hook, load_config, set_image_scale, small_run, tensor_outputs

DET_CONFIG = "cpu/retinanet_r18_fpn_deepforest_dyrep.py"
#: As in test_mm_det_train: 256 x 256 (the config: 320), 1 image per batch, to be quick on 2 CPU cores.
DET_SCALE, DET_BATCH = (256, 256), 1
#: The resume test: a DyRep step every 2 iterations over 6; the run is cut after 3, mid-interval.
RESUME_ITERS, RESUME_HALF, RESUME_INTERVAL = 6, 3, 2


def det_cfg(root: Path, work_dir: Path, iters: int, interval: int, **hook_options: Any) -> Any:
    """The small CPU detector config (RetinaNet R-18-FPN on deepforest, DyRep on backbone and neck) for
    a short run without validation that saves one checkpoint at the end."""
    cfg = load_config(DET_CONFIG, **{DEEPFOREST_ENV: str(root)})
    cfg = small_run(cfg, work_dir, iters, interval, batch_size=DET_BATCH, validate=False, **hook_options)
    set_image_scale(cfg, DET_SCALE)
    return cfg


def resume_cfg(root: Path, work_dir: Path, iters: int) -> Any:
    """The detector run of the resume test (with an EMAHook), deterministic, stopping after ``iters``."""
    cfg = det_cfg(root, work_dir, iters, RESUME_INTERVAL)
    cfg.custom_hooks.append(dict(type="EMAHook", momentum=0.01))
    cfg.randomness = dict(seed=0, deterministic=True)
    return cfg


def train_runner(cfg: Any, *hooks: tuple[Hook, str]) -> Any:
    """Build mmengine's Runner from ``cfg``, register the ``(hook, priority)`` pairs, train; the runner."""
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    for hook, priority in hooks:
        runner.register_hook(hook, priority)
    runner.train()
    return runner


class DyRepProbe(Hook):
    """What the model looks like around each DyRepHook step, recorded into the shared dict ``record``.

    Register both phases (see :func:`dyrep_probes`): ``"before"`` at ``"HIGH"`` priority runs before
    DyRepHook (``"ABOVE_NORMAL"``) in every ``after_train_iter``, ``"after"`` at ``"NORMAL"`` after it.
    Per iteration: the model wrapper in use, the loss, and the saliency collector's count of optimizer
    steps. Per due step: the saliency the step is about to use (reduced over ranks), the parameters the
    step added (right after it) and, with ``autocast`` set, the model's raw outputs on one fixed training
    batch under CPU autocast of that dtype right before and right after the step (eval mode).
    """

    KEYS = ("wrappers", "losses", "counts", "saliency", "new_params", "before", "after")

    def __init__(self, record: dict[str, list], phase: str, autocast: torch.dtype | None = None) -> None:
        self.record, self.phase, self.autocast = record, phase, autocast
        for key in self.KEYS:
            record.setdefault(key, [])

    def before_train(self, runner) -> None:
        if self.autocast is not None:
            self.batch = next(iter(side_loader(runner.train_dataloader, seed=1)))

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.phase == "before":
            model = runner.model
            self.record["wrappers"].append((id(model), type(model).__name__,
                                            getattr(model, "bucket_bytes_cap", None)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        ctl = find_hook(runner, "DyRepHook").controller
        model = unwrap(runner.model)
        if self.phase == "before":
            self.record["losses"].append(float(outputs["loss"].detach()))
            self.record["counts"].append(ctl.saliency.count)
            if ctl.is_due():
                self.record["saliency"].append(ctl.saliency.mean())
                self.record["names"] = {n for n, _ in model.named_parameters()}
                self.record["before"].append(self._outputs(model))
        elif "names" in self.record:
            old = self.record.pop("names")
            self.record["new_params"].append({n: p.detach().clone() for n, p in model.named_parameters()
                                              if n not in old})
            self.record["after"].append(self._outputs(model))

    def _outputs(self, model) -> list[torch.Tensor] | None:
        if self.autocast is None:
            return None
        with torch.autocast("cpu", dtype=self.autocast):
            return [t.float() for t in tensor_outputs(model, self.batch)]


def dyrep_probes(autocast: torch.dtype | None = None) -> tuple[dict[str, list], tuple, tuple]:
    """A shared record and both :class:`DyRepProbe` phases with their priorities, for :func:`train_runner`."""
    record: dict[str, list] = {}
    before, after = DyRepProbe(record, "before", autocast), DyRepProbe(record, "after", autocast)
    return record, (before, "HIGH"), (after, "NORMAL")


@OPTIM_WRAPPERS.register_module(force=True)
class CpuAmpOptimWrapper(AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` on a CPU, for the tests: only its ``__init__`` is replaced.

    mmengine 0.10.7's ``AmpOptimWrapper.__init__`` asserts a CUDA / NPU / MLU / MUSA device, and its
    ``torch.cuda.amp.GradScaler`` turns itself off without CUDA (no loss scaling at all). This
    ``__init__`` sets up ``OptimWrapper`` as the original does, with a working
    ``torch.amp.GradScaler('cpu')`` that takes ``loss_scale`` as the original does ("dynamic", a float
    for a static scale, or a dict), and ``dtype`` (bfloat16: the type of CPU autocast). Everything
    DyRepHook meets in training is AmpOptimWrapper's own code: ``backward`` (scaled loss), ``step``
    (``unscale_``, ``clip_grad``, steps skipped on inf/nan), ``optim_context`` (mmengine's ``autocast``),
    ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, loss_scale: str | float | dict = "dynamic", dtype: str = "bfloat16",
                 **kwargs: Any) -> None:
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = loss_scale if isinstance(loss_scale, float) else None
        if loss_scale == "dynamic":
            scaler_args: dict = {}
        elif isinstance(loss_scale, float):
            scaler_args = {"init_scale": loss_scale}
        else:
            scaler_args = dict(loss_scale)
        self.loss_scaler = torch.amp.GradScaler("cpu", **scaler_args)
        self.cast_dtype = getattr(torch, dtype)
