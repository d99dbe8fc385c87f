"""The study's bookkeeping: finished runs are skipped across sessions, and no verdict without enough seeds."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("accuracy_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(study, results: Path, variant: str, seed: int, recipe, acc: float = 0.9) -> None:
    """A run file as ``run_one`` writes it, read back through JSON like a later session does."""
    run = {"study_variant": variant, "seed": seed, "recipe": study.recipe_record(recipe), "test_acc": acc}
    study.write_json(study.run_path(results, variant, seed), run)


def test_a_finished_run_is_skipped_after_its_json_round_trip(study, tmp_path):
    # the recipe holds a tuple, which JSON reads back as a list; that must still count as the same recipe
    assert any(isinstance(v, tuple) for v in vars(study.RECIPE).values())
    write_run(study, tmp_path, "plain", 0, study.RECIPE)
    todo = study.pending(["plain", "dbb_all"], [0, 1], study.RECIPE, tmp_path)
    assert todo == [("dbb_all", 0), ("plain", 1), ("dbb_all", 1)]


def test_a_run_of_another_recipe_stops_the_study(study, tmp_path):
    write_run(study, tmp_path, "plain", 0, replace(study.RECIPE, epochs=study.RECIPE.epochs + 1))
    with pytest.raises(SystemExit, match="another recipe"):
        study.pending(["plain"], [0], study.RECIPE, tmp_path)


def test_the_seed_is_not_part_of_the_recipe(study):
    assert study.recipe_record(replace(study.RECIPE, seed=3)) == study.recipe_record(study.RECIPE)
    assert "seed" in json.dumps(study.recipe_record(study.RECIPE))  # kept, but always as 0


@pytest.mark.parametrize(("diffs", "verdict"), [
    ([0.5, 0.6], "too few seeds"),
    ([0.5, 0.6, 0.55], "higher"),
    ([-0.5, -0.6, -0.55], "lower"),
    ([0.5, -0.4, 0.1], "no difference"),
])
def test_the_paired_rule(study, diffs, verdict):
    base = {s: {"test_acc": 0.9} for s in range(len(diffs))}
    mine = {s: {"test_acc": 0.9 + d / 100} for s, d in enumerate(diffs)}
    result = study.paired(mine, base)
    assert result["verdict"] == verdict
    assert result["mean"] == pytest.approx(sum(diffs) / len(diffs))


def test_pairs_use_only_shared_seeds(study):
    base = {0: {"test_acc": 0.90}, 1: {"test_acc": 0.91}, 5: {"test_acc": 0.5}}
    mine = {0: {"test_acc": 0.91}, 1: {"test_acc": 0.92}, 2: {"test_acc": 0.99}}
    result = study.paired(mine, base)
    assert result["seeds"] == [0, 1]
    assert result["mean"] == pytest.approx(1.0)
