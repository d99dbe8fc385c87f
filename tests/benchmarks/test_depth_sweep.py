"""The depth sweep's bookkeeping: runs per depth are skipped once finished, collapses are found by epoch,
and the gain over plain is paired by seed within one depth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def sweep():
    return load_benchmark("depth_sweep")


def write_run(sweep, results: Path, depth: int, variant: str, seed: int, accs: list[float],
              calibrated: list[float] | None = None, cpu: float = 10.0) -> None:
    """One run's JSON; ``calibrated``: its per-epoch accuracies with recomputed statistics (the eval gap)."""
    epochs = [{"epoch": i + 1, "test_acc": a} for i, a in enumerate(accs)]
    for e, c in zip(epochs, calibrated or []):
        e["eval_gap"] = {"running": e["test_acc"], "recalibrated": c}
    run = {"depth": depth, "variant": variant, "seed": seed, "recipe": sweep.recipe_record(sweep.recipe_for(depth)),
           "test_acc": accs[-1], "folded_test_acc": accs[-1], "cpu_seconds_per_epoch": cpu, "epochs": epochs}
    sweep.write_json(sweep.run_path(results, depth, variant, seed), run)


def write_finals(sweep, results: Path, depth: int, finals: dict[str, list[float]]) -> None:
    """Two-epoch runs at ``depth`` (first epoch 0.5), one per variant and seed: ``finals[variant][seed]`` is
    the run's final accuracy."""
    for variant, accs in finals.items():
        for seed, acc in enumerate(accs):
            write_run(sweep, results, depth, variant, seed, [0.5, acc])


def test_finished_runs_are_skipped_per_depth(sweep, tmp_path):
    write_run(sweep, tmp_path, 30, "plain", 0, [0.8])
    todo = sweep.pending([10, 30], ["plain"], [0], tmp_path)
    assert todo == [(10, "plain", 0)]  # depth 10 is another recipe (another net), not a finished run


def test_a_run_of_another_recipe_stops_the_sweep(sweep, tmp_path):
    write_run(sweep, tmp_path, 30, "plain", 0, [0.8])
    with pytest.raises(SystemExit, match="another recipe"):
        sweep.pending([30], ["plain"], [0], tmp_path, replace(sweep.RECIPE, lr=0.05))


def test_collapses_and_paired_gain_within_a_depth(sweep, tmp_path):
    for seed, (plain, online) in enumerate([(0.80, 0.82), (0.78, 0.81), (0.79, 0.80)]):
        write_run(sweep, tmp_path, 30, "plain", seed, [0.5, 0.6, plain])
        write_run(sweep, tmp_path, 30, "orepa_all", seed, [0.5, 0.45 if seed == 1 else 0.6, online])
        write_run(sweep, tmp_path, 10, "plain", seed, [0.5, 0.6, 0.99])  # another depth: never paired with 30
    summary = sweep.summarise(sweep.load_runs(tmp_path))
    row = next(r for r in summary["rows"] if r["depth"] == 30 and r["variant"] == "orepa_all")
    assert row["collapsed_epochs"] == {0: [], 1: [2], 2: []}  # 15 points below plain at epoch 2 of seed 1
    assert row["vs_plain"]["diffs"] == pytest.approx([2.0, 3.0, 1.0])
    assert row["vs_plain"]["verdict"] == "higher"
    assert "s1: 2 (45)" in sweep.markdown(summary)


def test_calibrated_collapses_compare_both_runs_with_recomputed_statistics(sweep, tmp_path):
    # seed 0: a running-statistics collapse at epoch 2 that calibration removes; seed 1: one it does not;
    # seed 2: plain without the eval gap, so nothing can be said
    write_run(sweep, tmp_path, 30, "plain", 0, [0.5, 0.6, 0.8], calibrated=[0.55, 0.62, 0.8])
    write_run(sweep, tmp_path, 30, "orepa_all", 0, [0.5, 0.3, 0.8], calibrated=[0.55, 0.60, 0.8])
    write_run(sweep, tmp_path, 30, "plain", 1, [0.5, 0.6, 0.8], calibrated=[0.55, 0.62, 0.8])
    write_run(sweep, tmp_path, 30, "orepa_all", 1, [0.5, 0.3, 0.8], calibrated=[0.55, 0.40, 0.8])
    write_run(sweep, tmp_path, 30, "plain", 2, [0.5, 0.6, 0.8])
    write_run(sweep, tmp_path, 30, "orepa_all", 2, [0.5, 0.3, 0.8], calibrated=[0.55, 0.40, 0.8])
    summary = sweep.summarise(sweep.load_runs(tmp_path))
    row = next(r for r in summary["rows"] if r["variant"] == "orepa_all")
    assert row["collapsed_epochs"] == {0: [2], 1: [2], 2: [2]}
    assert row["calibrated_collapses"] == {0: [], 1: [2], 2: None}
    assert "| s1: 2 |" in sweep.markdown(summary)


def test_stage_two_variant_trains_dyrep_with_its_metric_under_its_own_name(sweep, tmp_path):
    recipe = replace(sweep.SMOKE, train_limit=200, test_limit=100, batch_size=50, step_fraction=0.25)
    run = sweep.run_one(10, "dyrep_online_per_weight", 0, tmp_path, recipe)
    saved = sweep.load_runs(tmp_path)[10]["dyrep_online_per_weight"][0]
    assert saved["variant"] == run["variant"] == "dyrep_online_per_weight"
    assert saved["dyrep_options"] == {"grow_at_start": 0.0, "metric": "snip_per_weight"}  # the paper's schedule
    assert run["branch_history"] and run["events"]  # DyRep stepped and grew


def test_dyrep_variants_pair_with_plain_and_with_random_sites(sweep, tmp_path):
    write_finals(sweep, tmp_path, 20, {"plain": [0.80, 0.78, 0.79], "dyrep_online": [0.82, 0.81, 0.80],
                                       "dyrep_online_random": [0.80, 0.79, 0.79]})
    summary = sweep.summarise(sweep.load_runs(tmp_path))
    rows = {r["variant"]: r for r in summary["rows"]}
    assert rows["dyrep_online"]["vs_random"]["diffs"] == pytest.approx([2.0, 2.0, 1.0])
    assert rows["dyrep_online_random"]["vs_random"] is None and rows["plain"]["vs_random"] is None


def test_stage_two_pairs_dyrep_with_the_depths_best_static_variant(sweep, tmp_path):
    # rep_all_dbb gains +3 on average, orepa_all +1: the ceiling is rep_all_dbb, and a DyRep run is paired with it
    write_finals(sweep, tmp_path, 20, {"plain": [0.80, 0.78, 0.79], "orepa_all": [0.81, 0.79, 0.80],
                                       "rep_all_dbb": [0.83, 0.81, 0.82], "dyrep_online": [0.82, 0.79, 0.80]})
    runs = sweep.load_runs(tmp_path)
    assert sweep.ceiling(runs[20]) == "rep_all_dbb"
    rows = {r["variant"]: r for r in sweep.summarise(runs)["rows"]}
    assert rows["dyrep_online"]["ceiling"] == "rep_all_dbb"
    assert rows["dyrep_online"]["vs_ceiling"]["diffs"] == pytest.approx([-1.0, -2.0, -2.0])
    assert rows["orepa_all"]["vs_ceiling"] is None  # static variants are the ceiling's candidates, not paired with it


def test_a_ceiling_needs_three_paired_seeds(sweep, tmp_path):
    for seed in (0, 1):
        write_run(sweep, tmp_path, 20, "plain", seed, [0.5, 0.80])
        write_run(sweep, tmp_path, 20, "rep_all_dbb", seed, [0.5, 0.90 + 0.01 * seed])
    assert sweep.ceiling(sweep.load_runs(tmp_path)[20]) is None


def test_online_minus_dbb_mode_is_paired_per_depth_and_cost_is_relative_to_plain(sweep, tmp_path):
    for seed, (online, dbb) in enumerate([(0.87, 0.89), (0.88, 0.89), (0.89, 0.90)]):
        write_run(sweep, tmp_path, 20, "plain", seed, [0.5, 0.85])
        write_run(sweep, tmp_path, 20, "rep_all_online", seed, [0.5, online], cpu=(15.0, 16.0, 20.0)[seed])
        write_run(sweep, tmp_path, 20, "rep_all_dbb", seed, [0.5, dbb])
        write_run(sweep, tmp_path, 30, "rep_all_online", seed, [0.5, 0.5])  # no dbb run at 30: no pair
    summary = sweep.summarise(sweep.load_runs(tmp_path))
    (gap,) = summary["mode_gaps"]
    assert (gap["depth"], gap["online"], gap["dbb"]) == (20, "rep_all_online", "rep_all_dbb")
    assert gap["diffs"] == pytest.approx([-2.0, -1.0, -1.0])
    rows = {(r["depth"], r["variant"]): r for r in summary["rows"]}
    # 15, 16, 20 CPU s/epoch against plain's 10 on the same seeds: the median ratio (the mean would be 1.7)
    assert rows[(20, "rep_all_online")]["cpu_vs_plain"] == pytest.approx(1.6)


def test_grown_order_lists_sites_in_the_order_dyrep_grew_them(sweep):
    run = {"branch_history": [{"grown": {"21": ["1x1"]}}, {"grown": {}}, {"grown": {"15": ["1x1"], "18": ["1x1"]}}]}
    assert sweep.grown_order(run) == ["21", "15", "18"]
    assert sweep.grown_order(run, first=2) == ["21", "15"]


def test_an_ablation_trains_its_base_variant_changed_by_its_prepare_under_its_own_name(sweep, tmp_path, monkeypatch):
    from dyrep_fx.block import find_blocks

    seen = []
    monkeypatch.setitem(sweep.ABLATIONS, "rep_all_online_wn",
                        ("rep_all_online", lambda model: seen.append(sorted(find_blocks(model)))))
    recipe = replace(sweep.SMOKE, train_limit=100, test_limit=50, batch_size=50)
    run = sweep.run_one(10, "rep_all_online_wn", 0, tmp_path, recipe)
    assert seen and len(seen[0]) >= 8  # called once, on the model with rep_all_online's grown blocks
    assert sweep.load_runs(tmp_path)[10]["rep_all_online_wn"][0]["variant"] == run["variant"] == "rep_all_online_wn"


def test_an_ablation_is_paired_with_its_base_and_with_dbb_mode_but_is_no_ceiling(sweep, tmp_path):
    write_finals(sweep, tmp_path, 20, {"plain": [0.85, 0.85, 0.85], "rep_all_online": [0.86, 0.87, 0.86],
                                       "rep_all_online_wn": [0.89, 0.89, 0.90], "rep_all_dbb": [0.88, 0.89, 0.88]})
    runs = sweep.load_runs(tmp_path)
    summary = sweep.summarise(runs)
    (ablation,) = summary["ablation_gaps"]
    assert (ablation["online"], ablation["dbb"]) == ("rep_all_online_wn", "rep_all_online")
    assert ablation["diffs"] == pytest.approx([3.0, 2.0, 4.0])
    gaps = {(g["online"], g["dbb"]): g["diffs"] for g in summary["mode_gaps"]}
    assert gaps[("rep_all_online_wn", "rep_all_dbb")] == pytest.approx([1.0, 0.0, 2.0])
    assert sweep.ceiling(runs[20]) == "rep_all_dbb"  # the ablation gains most but is not a library variant


def test_each_schedule_pairs_with_the_random_control_of_its_own_schedule(sweep, tmp_path):
    write_finals(sweep, tmp_path, 20, {"plain": [0.80, 0.78, 0.79],
                                       "dyrep_start50_per_weight": [0.84, 0.83, 0.83],
                                       "dyrep_start50_random": [0.83, 0.81, 0.83],
                                       "dyrep_online_random": [0.79, 0.78, 0.78],
                                       "orepa_all": [0.83, 0.83, 0.82]})
    rows = {r["variant"]: r for r in sweep.summarise(sweep.load_runs(tmp_path))["rows"]}
    assert rows["dyrep_start50_per_weight"]["vs_orepa_all"]["diffs"] == pytest.approx([1.0, 0.0, 1.0])
    assert rows["orepa_all"]["vs_orepa_all"] is None
    assert rows["dyrep_start50_per_weight"]["random_control"] == "dyrep_start50_random"
    assert rows["dyrep_start50_per_weight"]["vs_random"]["diffs"] == pytest.approx([1.0, 2.0, 0.0])
    assert rows["dyrep_start50_random"]["vs_random"] is None


def test_the_frontier_keeps_the_best_gain_at_or_below_each_cost(sweep):
    points = [(1.34, 1.5), (1.0, 0.0), (6.0, 2.5), (1.3, 2.0), (7.5, 2.4)]
    assert sweep.frontier(points) == [(1.0, 0.0), (1.3, 2.0), (6.0, 2.5)]


def test_a_dyrep_runs_mean_cost_weights_each_structure_by_the_iterations_it_trained(sweep):
    kinds = ["1x1", "1xk", "kx1"]
    grown = sweep.structure_cost(20, {"3": kinds})
    cut = sweep.structure_cost(20, {"3": ["1x1"]})
    assert sweep.structure_cost(20, {}) == 1.0 and grown > cut > 1.0
    run = {"total_iterations": 400, "events": [{"unit": 100, "grown": {"3": kinds}, "cut": {}},
                                               {"unit": 300, "grown": {}, "cut": {"3": ["1xk", "kx1"]}}]}
    ratios = sweep.training_ratios(run, 20)
    assert ratios["end"] == pytest.approx(cut)
    assert ratios["mean"] == pytest.approx((100 * 1.0 + 200 * grown + 100 * cut) / 400)


def test_the_mean_step_ratio_scales_the_measured_end_by_the_predicted_course(sweep):
    cost = {"variants": {"dyrep_online": {"vs_plain": 1.4}, "orepa_all": {"vs_plain": 1.3}}}
    row = {"variant": "dyrep_online", "predicted_mean_ratio": 1.1, "predicted_end_ratio": 1.2}
    assert sweep.mean_step_ratio(row, cost) == pytest.approx(1.2)  # half the predicted excess: half the measured
    assert sweep.mean_step_ratio({"variant": "orepa_all"}, cost) == 1.3


def test_regime_figures_name_the_main_jobs_dyrep_setting(sweep, tmp_path):
    regime = sweep.regime_variant()
    assert sweep.DYREP_VARIANTS[regime] == ("dyrep_online", sweep.REGIME_DYREP)
    write_finals(sweep, tmp_path, 20, {"plain": [0.80, 0.78, 0.79], "orepa_all": [0.82, 0.80, 0.81],
                                       regime: [0.83, 0.80, 0.80]})
    cost = {"variants": {"plain": {"vs_plain": 1.0}, "orepa_all": {"vs_plain": 1.3}, regime: {"vs_plain": 1.25}}}
    figures = sweep.regime_figures(sweep.summarise(sweep.load_runs(tmp_path)), cost)
    assert list(figures["variants"]) == ["plain", f"dyrep ({regime})", "orepa_all"]
    assert figures["variants"][f"dyrep ({regime})"]["vs_plain"]["mean"] == pytest.approx(2.0)
    assert figures["variants"]["orepa_all"]["step_ratio"] == 1.3 and figures["seeds"] == 3


def test_the_calibrated_gain_pairs_the_last_epochs_calibrated_accuracies(sweep, tmp_path):
    """The secondary figure of the 18-epoch runs: the same seeds paired on the last epoch's accuracy with
    recomputed BatchNorm statistics, not on the running-statistics accuracy the primary figure uses."""
    running = {"plain": [0.80, 0.78, 0.79], "dyrep_start50_per_weight": [0.80, 0.78, 0.79],
               "dyrep_start50_random": [0.81, 0.79, 0.80]}
    calibrated = {"plain": [0.80, 0.78, 0.79], "dyrep_start50_per_weight": [0.82, 0.81, 0.80],
                  "dyrep_start50_random": [0.80, 0.79, 0.79]}
    for variant, accs in running.items():
        for seed, acc in enumerate(accs):
            write_run(sweep, tmp_path, 20, variant, seed, [0.5, acc], calibrated=[0.5, calibrated[variant][seed]])
    rows = {r["variant"]: r for r in sweep.summarise(sweep.load_runs(tmp_path))["rows"]}
    mine = rows["dyrep_start50_per_weight"]
    assert mine["vs_plain"]["diffs"] == pytest.approx([0.0, 0.0, 0.0])
    assert mine["vs_plain_calibrated"]["diffs"] == pytest.approx([2.0, 3.0, 1.0])
    assert mine["vs_random_calibrated"]["diffs"] == pytest.approx([2.0, 2.0, 1.0])
    assert rows["plain"]["vs_plain_calibrated"] is None


def test_the_per_epoch_curves_average_the_sweeps_measure_over_seeds(sweep, tmp_path):
    """The curves show what the tables pair (running statistics), not the calibrated accuracies beside it."""
    write_run(sweep, tmp_path, 20, "plain", 0, [0.70, 0.80], calibrated=[0.75, 0.90])
    write_run(sweep, tmp_path, 20, "plain", 1, [0.60, 0.90], calibrated=[0.65, 0.95])
    curves = sweep.mean_curves(sweep.load_runs(tmp_path)[20])
    assert curves["plain"] == pytest.approx([65.0, 85.0])
    assert sweep.plot_curves(sweep.load_runs(tmp_path), 20, tmp_path / "curves.png")
    assert not sweep.plot_curves(sweep.load_runs(tmp_path), 30, tmp_path / "none.png")
