"""The stability probe's written form (benchmarks/stability.py): summaries that keep what the report reads."""

from __future__ import annotations

import json
import math

import pytest
from helpers.benchmark_modules import load_benchmark

stability = load_benchmark("stability")


def _record(variant: str, steps: int, scale: float, spike_at: int | None = None) -> dict:
    """A probe's full record: two sites whose relative change falls with the step, one loss spike."""
    rows = []
    for it in range(1, steps + 1):
        rel = {"a": scale * (1 + 1 / it), "b": scale * (2 + (it % 7) / 7)} if it > 1 else {}
        row = {"it": it, "loss": 10.0 if it == spike_at else 1.0 + 0.001 * (it % 5), "rel": rel,
               "radial": {k: 0.05 * v * (1 + (it % 3)) for k, v in rel.items()}, "norm": {"a": 1.0 + it, "b": 2.0}}
        if variant != "plain":
            row["main_scale"] = {"a": 0.5, "b": 0.7}
            row["share"] = {"a": {"1x1": 0.01 * it, "prior": 0.2}, "b": {"1x1": 0.03 * it}}
        rows.append(row)
    return {"depth": 30, "variant": variant, "seed": 0, "epochs_run": 2, "test_acc_per_epoch": [0.5, 0.7],
            "evals": [{"it": 50, "running": 0.4, "recalibrated": 0.6}], "steps": rows}


def _full_report_row(run: dict, plain: dict) -> tuple:
    """What the report showed when the probes kept every step."""
    windows = stability.WINDOWS
    return (tuple(round(stability.paired_ratio(run["steps"], plain["steps"], a, b), 2) for a, b in windows),
            tuple(round(stability.radial_share(run["steps"], a, b), 3) for a, b in windows[:2]),
            [s["it"] for i, s in enumerate(run["steps"])
             if i >= 50 and s["loss"] > 2 * sorted(x["loss"] for x in run["steps"][i - 50:i])[25]])


def test_the_report_reads_from_summaries_what_it_read_from_every_step(tmp_path):
    plain, run = _record("plain", 620, 1.0), _record("orepa_all", 620, 1.3, spike_at=300)
    paths = stability.write_probes(tmp_path / "tag", [run, plain])
    table = stability.report(tmp_path)
    ratios, radial, spikes = _full_report_row(run, plain)
    row = next(line for line in table.splitlines() if "orepa_all" in line)
    assert ", ".join(f"{r:.2f}" for r in ratios) in row
    assert ", ".join(f"{r:.3f}" for r in radial) in row
    assert spikes == [300] and f"| 1 {spikes} |" in row
    assert "| 50, 70 |" in row and "| 20.0 (20.0) |" in row
    summary = json.loads(paths[0].read_text())
    assert "steps" not in summary and len(summary["loss"]) == 620
    assert summary["sampled"]["it"] == list(range(10, 621, 10))
    assert summary["sampled"]["share_median"]["1x1"][0] == pytest.approx(0.2)  # step 10: median(0.1, 0.3)
    assert summary["sampled"]["share_median"]["prior"][0] == pytest.approx(0.2)


def test_a_variant_written_without_its_plain_run_is_paired_on_the_sampled_steps(tmp_path):
    plain, run = _record("plain", 300, 1.0), _record("orepa_all", 300, 1.5)
    stability.write_probes(tmp_path / "a", [plain])
    stability.write_probes(tmp_path / "a", [run])
    row = next(line for line in stability.report(tmp_path).splitlines() if "orepa_all" in line)
    assert "~1.50, ~1.50, ~nan" in row


def test_summaries_are_small_and_valid_json(tmp_path):
    run = _record("orepa_all", 706, 1.0)
    full = len(json.dumps(run, indent=2))
    path = stability.write_probes(tmp_path, [run])[0]
    text = path.read_text()
    summary = json.loads(text)  # strict JSON: an empty window is null, not NaN
    assert "NaN" not in text and summary["windows"][2]["radial_share"] is not None
    assert summary["windows"][2]["median_rel"] is not None
    assert len(text) < full / 10
    assert math.isclose(summary["windows"][0]["radial_share"], stability.radial_share(run["steps"], 0, 100),
                        rel_tol=1e-5)


def test_compact_rewrites_a_folder_of_full_records_and_refuses_summaries(tmp_path):
    for run in (_record("plain", 120, 1.0), _record("orepa_all", 120, 1.2)):
        (tmp_path / f"depth30_{run['variant']}_seed0.json").write_text(json.dumps(run))
    stability.compact(tmp_path)
    assert json.loads((tmp_path / "depth30_orepa_all_seed0.json").read_text())["windows"][0]["rel_vs_plain"]
    with pytest.raises(ValueError, match="summaries already"):
        stability.compact(tmp_path)


def test_a_record_with_gaps_in_its_steps_is_refused():
    run = _record("plain", 30, 1.0)
    del run["steps"][5]
    with pytest.raises(ValueError, match="not consecutive"):
        stability.summarise(run)
