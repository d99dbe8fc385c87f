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


def test_runs_saved_with_the_old_demo_variant_list_still_count(study, tmp_path):
    # a study run trains one variant by name; the demo's default variant list is not part of its recipe
    record = {**study.recipe_record(study.RECIPE), "variants": ["plain", "dyrep", "dbb"]}
    run = {"study_variant": "plain", "seed": 0, "recipe": record, "test_acc": 0.9}
    study.write_json(study.run_path(tmp_path, "plain", 0), run)
    assert study.pending(["plain"], [0], study.RECIPE, tmp_path) == []


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


def test_report_fills_only_the_marked_blocks_and_states_the_verdicts(study, tmp_path):
    runs = {"plain": {s: {"test_acc": 0.90} for s in range(3)},
            "dbb_all": {s: {"test_acc": 0.905 + 0.001 * s} for s in range(3)},
            "orepa_all": {s: {"test_acc": 0.90 + 0.001 * (s - 1)} for s in range(3)}}
    rows = [{"variant": v, "seeds": [0, 1, 2], "vs_plain": study.paired(r, runs["plain"]) if v != "plain" else None,
             "vs_control": None} for v, r in runs.items()]
    stage1, stage2 = study.stage_texts({"rows": rows})
    assert "`dbb_all` vs plain +0.60 ± 0.06 points over 3 seeds (higher)" in stage1
    assert "`orepa_all` vs plain +0.00 ± 0.06 points over 3 seeds (no difference)" in stage1
    assert "stage 2 runs 5 seeds" in stage1 and "has not started" in stage2
    readme, bench = tmp_path / "README.md", tmp_path / "bench.md"
    readme.write_text("before\n<!-- study -->\nold\n<!-- /study -->\nafter\n")
    bench.write_text("no block here\n")
    with pytest.raises(SystemExit, match="no <!-- study -->"):
        study.write_docs({"rows": []}, "2026-11-30", readme, bench)
    bench.write_text("<!-- study -->\n<!-- /study -->\n")
    monkey_rows = {"rows": []}
    study.write_docs(monkey_rows, "2026-11-30", readme, bench)
    text = readme.read_text()
    assert text.startswith("before\n<!-- study -->\nThe reproduction study") and text.endswith("<!-- /study -->\nafter\n")
    assert "old" not in text and "measured 2026-11-30" in text


@pytest.mark.parametrize(("dyrep_gain", "concluded"), [(0.0, True), (0.6, False)])
def test_the_stage_2_conclusion_needs_every_pair_within_noise(study, dyrep_gain, concluded):
    plain = {s: {"test_acc": 0.90} for s in range(3)}
    noise = [0.001, -0.001, 0.0005]
    rows = [{"variant": "plain", "seeds": [0, 1, 2], "vs_plain": None, "vs_control": None}]
    for v in study.STAGE2:
        gain = dyrep_gain if v == "dyrep_online" else 0.0
        runs = {s: {"test_acc": 0.90 + gain / 100 + noise[s] * (1 + len(v) % 3)} for s in range(3)}
        control = {s: {"test_acc": 0.90 + noise[s]} for s in range(3)}
        rows.append({"variant": v, "seeds": [0, 1, 2], "vs_plain": study.paired(runs, plain),
                     "vs_control": study.paired(runs, control) if v in study.CONTROLS else None})
    _, stage2 = study.stage_texts({"rows": rows})
    assert "Unfinished" not in stage2
    assert ("no site choice better than chance" in stage2) is concluded
