"""mmengine's ``compile`` (torch.compile of the Runner's train step) with DyRepHook, on the toy classifier of
tests/helpers/mm_toy.py (a real Runner built from a config; seconds per run on a CPU):

* without DDP, ``compile=True`` as a user writes it (inductor): the one compiled train step recompiles for each
  new structure and computes what the same run does eagerly;
* under ``MMDistributedDataParallel`` (2 gloo ranks, tests/scripts/mm_compile_worker.py): the hook rebuilds the
  wrapper after each change, and mmengine's compiled train step is bound to the wrapper it was compiled on, so
  the hook compiles the new wrapper's ``train_step`` with the config's options
  (``dyrep_fx.mm.wrappers.recompile_steps``). The worker's backend records the graphs and runs them as
  captured (inductor's C++ builds on two ranks would take minutes here; what is checked is the compiled
  step's life, not the backend).

mmengine 0.10.7 cannot compile a train step under ``paramwise_cfg``: its groups are ConfigDicts, which dynamo's
tracing of ``optimizer.step`` fails on with or without DyRep, so the toy config has none. Past
``torch._dynamo.config.recompile_limit`` (8) recompiles of a frame, dynamo runs that frame eagerly: a run
with many structural changes stops compiling the frames the changes touch unless the limit is raised.
"""

from __future__ import annotations

import pytest
import torch
from helpers.launch import torchrun
from helpers.mm_data import find_hook
from helpers.mm_toy import compile_probe, toy_cfg, train_toy

from dyrep_fx import api

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ITERS, INTERVAL = 6, 2
#: DyRep steps after iterations 2, 4 and 6, each a growth; the 0-based indices of the iterations right after
#: the first two (the third comes after the last iteration).
GROWN_UNITS, AFTER_CHANGE = [2, 4, 6], [2, 4]
#: Losses of the compiled run vs the eager twin, float32: inductor fuses and reorders kernels (measured here:
#: 2e-7 relative); the DDP worker's backend runs the captured graphs as they are, so its losses are bitwise
#: the eager ones.
LOSS_RTOL = 1e-5


def new_graphs(record: dict, index: int) -> int:
    """Graphs compiled during iteration ``index`` (the probe records the cumulative count after each)."""
    counts = record["graphs"]
    return counts[index] - (counts[index - 1] if index else 0)


def test_compile_true_trains_a_growing_model_and_matches_eager(tmp_path):
    torch._dynamo.reset()  # the recompile limit counts per code object over the whole process
    record, probe = compile_probe()
    runner = train_toy(toy_cfg(tmp_path / "compiled", ITERS, INTERVAL, compile=True), probe)
    eager_record, eager_probe = compile_probe()
    eager = train_toy(toy_cfg(tmp_path / "eager", ITERS, INTERVAL), eager_probe)
    ctl, eager_ctl = (find_hook(r, "DyRepHook").controller for r in (runner, eager))
    assert [e["unit"] for e in ctl.history if e["grown"]] == GROWN_UNITS
    assert [e["grown"] for e in ctl.history] == [e["grown"] for e in eager_ctl.history]
    assert api.blocks(runner.model) and runner.model is ctl.model  # no wrapper: the model itself grew
    # every iteration ran mmengine's compiled train step; the first one after each growth compiled new graphs
    assert all(compiled for _, _, compiled in record["wrappers"]) and len(record["wrappers"]) == ITERS
    assert not any(compiled for _, _, compiled in eager_record["wrappers"])
    assert all(new_graphs(record, i) > 0 for i in [0, *AFTER_CHANGE]), record["graphs"]
    assert record["losses"] == pytest.approx(eager_record["losses"], rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm_compile_ddp")
    torchrun("mm_compile_worker.py", "--out", str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_rewrap_keeps_the_compiled_train_step(ranks):
    for r in ranks:
        ids = [w[0] for w in r["wrappers"]]
        # a new wrapper after each change (iterations 1-2 in the Runner's, 3-4 and 5-6 in rebuilt ones) ...
        assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4] == ids[5]
        assert {w[1] for w in r["wrappers"]} == {"MMDistributedDataParallel"} == {r["final_wrapper"]}
        # ... and every iteration ran a train step compiled for the wrapper in use, not for one it replaced
        assert all(compiled for _, _, compiled in r["wrappers"]), r["wrappers"]
        # the iteration after each change compiled graphs, and they take the grown blocks' parameters
        for i in AFTER_CHANGE:
            grown_inputs = [g for g in r["graph_log"] if g["iter"] == i
                            and any("main_scale" in name for name in g["inputs"])]
            assert grown_inputs, (i, [g["inputs"][:5] for g in r["graph_log"] if g["iter"] == i])


def test_ddp_compiled_run_grows_like_the_eager_run_and_computes_the_same(ranks):
    r0, r1 = ranks
    assert r0["history"] == r1["history"]
    for r in ranks:
        assert [e["unit"] for e in r["history"] if e["grown"]] == GROWN_UNITS
        assert [e["grown"] for e in r["history"]] == [e["grown"] for e in r["eager_history"]]
        assert r["wraps_controlled"] and r["blocks"]  # the last wrapper holds the grown model
        assert r["losses"] == pytest.approx(r["eager_losses"], rel=LOSS_RTOL) and len(r["losses"]) == ITERS
    assert r0["losses"] != r1["losses"]  # each rank trained on its own shard
