"""The side-by-side cost of the sweep's structures: each DyRep run is timed with the structure it ended
training with (restored from its JSON), each static variant grown everywhere."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny plain run, a tiny DyRep run that grew and a tiny ablation run, at 10 convs."""
    sweep = load_benchmark("depth_sweep")
    results = tmp_path_factory.mktemp("sweep")
    recipe = replace(sweep.SMOKE, train_limit=200, test_limit=100, batch_size=50, step_fraction=0.25)
    runs = {v: sweep.run_one(10, v, 0, results, recipe) for v in ("plain", "dyrep_online", "rep_all_online_wn")}
    return results, runs


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_dyrep_structures_are_the_runs_end_of_training_structures(trained):
    cost = load_benchmark("sweep_cost")
    results, runs = trained
    models = cost.structures(10, cost.load_runs(results)[10])
    assert set(models) == {"plain", "dyrep_online", "rep_all_online_wn"}
    (grown,) = models["dyrep_online"]
    assert runs["dyrep_online"]["params_training_end"] > runs["plain"]["params_training_end"]  # it did grow
    assert _params(grown) == runs["dyrep_online"]["params_training_end"]
    assert _params(models["plain"][0]) == runs["plain"]["params_training_end"]


def test_the_measurement_is_written_relative_to_plain(trained):
    cost = load_benchmark("sweep_cost")
    results, _ = trained
    out = cost.main(["--depth", "10", "--results", str(results), "--rounds", "2", "--steps", "1",
                     "--batch-size", "8"])
    saved = json.loads((results / "cost_depth10.json").read_text())
    assert saved["variants"]["plain"]["vs_plain"] == 1.0
    assert saved["variants"]["dyrep_online"]["samples"] == 2  # one model, two rounds
    assert saved["variants"] == out["variants"]


def test_an_ablation_is_timed_as_its_base_variant_changed_by_its_prepare(trained):
    from torch.nn.utils import parametrize

    cost = load_benchmark("sweep_cost")
    results, runs = trained
    (ablated,) = cost.structures(10, cost.load_runs(results)[10])["rep_all_online_wn"]
    assert _params(ablated) == runs["rep_all_online_wn"]["params_training_end"] > runs["plain"]["params_training_end"]
    assert any(parametrize.is_parametrized(m) for m in ablated.modules())  # weight-normalised, not rep_all_online
