"""The main job's setting (``DemoConfig.regime``): the 20-conv regime, DyRep grown from the start, and the
committed paired figures printed beside the single run."""

from __future__ import annotations

import json

import pytest

import dyrep_fx_examples.demo as demo
from dyrep_fx import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_main_job_trains_the_regime_net_with_dyreps_measured_setting():
    config = demo.DemoConfig.regime()
    assert config.net == "depth20" and config.variants == ("plain", "dyrep", "orepa_all")
    assert config.dyrep_options == demo.REGIME_DYREP and config.augment
    assert demo.DemoConfig.quick().net == "demo"  # --quick stays the small smoke net


def test_the_regime_dyrep_grows_half_the_sites_at_the_first_iteration():
    config = demo.DemoConfig.regime(epochs=1, train_limit=200, test_limit=100, batch_size=50, progress=False)
    run = demo.run_variant("dyrep", config)
    first = run["events"][0]
    assert first["unit"] == 1
    assert len(first["grown"]) == round(demo.REGIME_DYREP["grow_at_start"] * 20)  # 20 convs, all candidates
    assert run["fold_max_abs_error"] < 1e-5


def test_the_committed_figures_are_printed_beside_the_run(tmp_path, monkeypatch):
    figures = {"depth": 20, "seeds": 5, "recipe": "6 epochs on 30k images", "plain_spread": 1.5,
               "plot": "benchmarks/results/sweep/stage2_depth20.png",
               "variants": {"plain": {"vs_plain": {"mean": 0.0, "se": 0.0}, "vs_random": None, "step_ratio": 1.0,
                                      "mean_step_ratio": None},
                            "dyrep (x)": {"vs_plain": {"mean": 1.47, "se": 0.67},
                                          "vs_random": {"mean": -0.29, "se": 0.4},
                                          "step_ratio": 1.31, "mean_step_ratio": 1.22}}}
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(figures))
    monkeypatch.setattr(demo, "REGIME_FIGURES", path)
    text = cli._regime_lines(demo.DemoConfig.regime())
    assert "over 5 paired seeds" in text and "3 epochs on 20000 images" in text
    assert "| dyrep (x) | +1.47 ± 0.67 | -0.29 ± 0.40 | 1.31 (1.22) |" in text
    assert "spreads by 1.5 points" in text and "stage2_depth20.png" in text
    monkeypatch.setattr(demo, "REGIME_FIGURES", tmp_path / "absent.json")
    assert "not installed" in cli._regime_lines(demo.DemoConfig.regime())
