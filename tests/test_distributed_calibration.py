"""BatchNorm calibration under real DDP (2 ranks, gloo, CPU) checked by values.

Each rank calibrates on its own data (a different distribution per rank). The statistics every rank ends
with must be the mean over the ranks of what each rank's calibration gives on its own data, computed
separately on each rank outside any process group (and, for ``dyrep_fx.calibrate``, by hand from the
BatchNorms' inputs). Both uses are covered: ``dyrep_fx.calibrate`` on a model trained under DDP, and the
calibration of a dbb-mode growth step's new BatchNorms (``DyRep.step`` under DDP).

A sum over the ranks instead of a mean leaves the statistics equal on every rank, so only these values
catch it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

WORKER = "ddp_calibration_worker.py"
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("ddp_calibration")
    torchrun(WORKER, "--out", str(out), nproc=WORLD)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD)) and all(r["world"] == WORLD for r in results)
    return results


def check_mean_of_own(results: list[dict], part: str) -> None:
    """Every rank's distributed statistics equal the mean over ranks of each rank's own calibration, and
    that mean is not any single rank's own (the ranks' data differ) nor their sum."""
    names = list(results[0][part]["ddp"])
    assert names and all(list(r[part]["ddp"]) == names for r in results)
    for name in names:
        for i, what in enumerate(("running_mean", "running_var")):
            own = [r[part]["own"][name][i] for r in results]
            expected = torch.stack(own).mean(0)
            for r in results:
                got = r[part]["ddp"][name][i]
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14,
                                           msg=lambda m, r=r, n=name, w=what: f"rank {r['rank']} {n}.{w}: {m}")
            # not vacuous: the ranks' own statistics differ, so neither one rank's nor the sum would pass
            assert (own[0] - own[1]).abs().max() > 1e-3 * expected.abs().max(), (name, what)
            assert (torch.stack(own).sum(0) - expected).abs().max() > 1e-3 * expected.abs().max(), (name, what)


@pytest.mark.slow
def test_calibrate_under_ddp_gives_the_mean_of_each_ranks_own_calibration(ranks):
    for r in ranks:
        assert r["calibrate"]["used"] == 3
        # each rank's own calibration is what the definition gives: the batches' average statistics
        for name, (mean, var) in r["calibrate"]["own"].items():
            hand_mean, hand_var = r["calibrate"]["hand"][name]
            torch.testing.assert_close(mean, hand_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(var, hand_var, rtol=1e-12, atol=1e-14)
    assert set(ranks[0]["calibrate"]["ddp"]) == {"bn1", "bn2", "bn3"}
    check_mean_of_own(ranks, "calibrate")


@pytest.mark.slow
def test_dbb_growth_calibrates_new_batchnorms_to_the_mean_of_each_ranks_own_calibration(ranks):
    grow = [r["grow"] for r in ranks]
    assert grow[0]["grown"] and all(g["grown"] == grow[0]["grown"] for g in grow)
    assert all(g["used"] == 3 for g in grow)
    # every new BatchNorm of the grown branches (1x1_kxk and 1x1_avg bring two each)
    assert len(grow[0]["new_bns"]) > len(next(iter(grow[0]["grown"].values())))
    check_mean_of_own(ranks, "grow")
