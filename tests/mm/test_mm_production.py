"""DyRepHook in production runs of mmengine's Runner, on the small CPU detector config (RetinaNet R-18-FPN on
deepforest's aerial tree crowns, DyRep on backbone and neck):

* distributed: 2 ranks on gloo with ``launcher='pytorch'`` and ``MMDistributedDataParallel``
  (tests/scripts/mm_ddp_worker.py, started with torchrun); a step the ranks disagree on fails on both;
* resume: half a run, then a fresh process resuming it (tests/scripts/mm_resume_worker.py), equals the
  uninterrupted run bitwise, EMA included; checkpoints that do not fit the config fail and change nothing;
* mixed precision: mmengine's ``AmpOptimWrapper`` (bf16 autocast on the CPU, a real loss scale);
* gradient accumulation (``accumulative_counts``) with ``clip_grad``.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.launch import run_script, torchrun
from helpers.mm_data import find_hook
from helpers.mm_production import (
    RESUME_HALF,
    RESUME_ITERS,
    det_cfg,
    dyrep_probes,
    resume_cfg,
    train_runner,
)
from helpers.numerics import assert_same

from dyrep_fx import api
from dyrep_fx.mm.checkpoint import load_mmengine_checkpoint
from dyrep_fx.mm.wrappers import unwrap

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def finite(values) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def optimizer_ids(runner) -> set[int]:
    return {id(p) for g in runner.optim_wrapper.optimizer.param_groups for p in g["params"]}


# -- distributed ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(deepforest_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm_ddp")
    torchrun("mm_ddp_worker.py", "--data", str(deepforest_root), "--out", str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_ranks_take_the_same_steps_and_end_with_the_same_model(ranks):
    r0, r1 = ranks
    assert r0["history"] == r1["history"] and [e["unit"] for e in r0["history"]] == [2, 4]
    assert all(e["grown"] for e in r0["history"])
    assert r0["structures"] == r1["structures"] and r0["blocks"] == r1["blocks"] and r0["blocks"]
    # every decision came from the same saliency, all-reduced once per step
    assert len(r0["saliency"]) == 2 and r0["saliency"] == r1["saliency"]
    assert list(r0["params"]) == list(r1["params"])
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    # new parameters: identical on both ranks once each step is done, and trained since the first one
    for new0, new1 in zip(r0["new_params"], r1["new_params"]):
        assert new0 and list(new0) == list(new1)
        assert all(torch.equal(new0[n], new1[n]) for n in new0)
    assert any(not torch.equal(v, r0["params"][n]) for n, v in r0["new_params"][0].items())
    # training went on after each change, on different data on each rank
    assert len(r0["losses"]) == len(r1["losses"]) == 5 and finite(r0["losses"]) and finite(r1["losses"])
    assert r0["losses"] != r1["losses"]


def test_ddp_wrapper_is_rebuilt_from_model_wrapper_cfg_after_each_change(ranks):
    for r in ranks:
        ids = [w[0] for w in r["wrappers"]]
        # iterations 1-2 ran in the Runner's wrapper, 3-4 and 5 in one rebuilt after each step
        assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4]
        assert {w[1:] for w in r["wrappers"]} == {("MMDistributedDataParallel", 5 * 1024 * 1024)}
        assert r["wrapper"] == ("MMDistributedDataParallel", 5 * 1024 * 1024)  # the config's bucket_cap_mb=5
        assert r["optimizer_ids"] == r["trainable_ids"]


def test_ddp_step_the_ranks_disagree_on_fails_on_every_rank_and_changes_nothing(ranks):
    for r in ranks:
        grow, cut = r["refused_grow"], r["refused_cut"]
        assert grow["unchanged"] and cut["unchanged"]
        # a different topk per rank: the growth decision is named, with what each rank would grow (site, kinds)
        site = r"\[\"[\w.]+\", \[[\w\", ]+\]\]"
        assert re.search(rf"grow: \[{site}\] on ranks \[0\]; \[{site}, {site}\] on ranks \[1\]",
                         grow["error"]), grow["error"]
        assert "cut:" not in grow["error"]
        # branch scales that drifted on rank 1: the cut it alone would make is named
        assert re.search(r"cut: \{\} on ranks \[0\]; \{\"neck\.[\w.]+\": \[\"[\w\", ]+\]\} on ranks \[1\]",
                         cut["error"]), cut["error"]
        assert "grow:" not in cut["error"]


# -- resume --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(deepforest_root, tmp_path_factory):
    deterministic = torch.are_deterministic_algorithms_enabled()  # randomness.deterministic turns it on
    straight_dir, resumed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    try:
        record, *probes = dyrep_probes()
        train_runner(resume_cfg(deepforest_root, straight_dir, RESUME_ITERS), *probes)
        train_runner(resume_cfg(deepforest_root, resumed_dir, RESUME_HALF))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    out = resumed_dir / "worker.pt"
    run_script("mm_resume_worker.py", "--data", str(deepforest_root), "--work", str(resumed_dir),
               "--out", str(out))
    return SimpleNamespace(
        straight=load_mmengine_checkpoint(str(straight_dir / f"iter_{RESUME_ITERS}.pth")),
        half_path=resumed_dir / f"iter_{RESUME_HALF}.pth",
        resumed=load_mmengine_checkpoint(str(resumed_dir / f"iter_{RESUME_ITERS}.pth")),
        worker=torch.load(out, weights_only=True), losses=record["losses"], saliency=record["saliency"])


def test_resume_in_a_fresh_process_equals_the_uninterrupted_run(resumed):
    half = load_mmengine_checkpoint(str(resumed.half_path))["dyrep_fx"]
    # cut mid-interval, after a growth; more growth after the resume
    assert half["units"] == RESUME_HALF and half["saliency"]["count"] == 1 and half["history"][0]["grown"]
    straight, again = resumed.straight, resumed.resumed
    assert [e["unit"] for e in straight["dyrep_fx"]["history"] if e["grown"]] == [2, 4, 6]
    assert again["meta"]["iter"] == straight["meta"]["iter"] == RESUME_ITERS
    assert resumed.worker["losses"] == resumed.losses[RESUME_HALF:]
    # the step after the resume ranked the sites on the whole interval, the iteration before the cut included
    assert resumed.worker["saliency"] == resumed.saliency[1:]
    for key in ("dyrep_fx", "state_dict", "ema_state_dict", "optimizer", "param_schedulers"):
        assert_same(again[key], straight[key], key)


def test_resume_needs_no_unsafe_loading_switch_from_the_user(resumed):
    """The fresh process ran without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which torch >= 2.6 needs for mmengine's
    checkpoints: DyRepHook set it around mmengine's load only, and it is unset again afterwards."""
    worker = resumed.worker
    assert worker["flag_before"] is None and worker["default_load_refused"]
    assert worker["flag_after"] is None and worker["iter"] == RESUME_ITERS


@pytest.fixture
def fresh_runner(deepforest_root, tmp_path):
    """A Runner of the same config, set up as ``Runner.train`` has it when it resumes a checkpoint."""
    from mmengine.runner import Runner

    cfg = det_cfg(deepforest_root, tmp_path, 2, 1)
    cfg.resume = True  # after_load_checkpoint restores the whole controller state only when resuming
    runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    return runner


def _site_renamed(state):
    target, spec = next((t, s) for t, s in state["structures"].items() if s["sites"])
    spec["sites"]["layer9.conv"] = spec["sites"].pop(next(iter(spec["sites"])))


def _other_mode(state):
    next(iter(state["structures"].values()))["mode"] = "dbb"


def _unknown_parameter(state):
    state["optimizer_layout"]["params"][0].append("neck.nowhere.weight")


def _other_watched_sites(state):
    state["saliency"]["names"][0] = "backbone.layer9.conv"


BAD_STATES = [
    (_site_renamed, r"names site 'layer9.conv', which this model does not have"),
    (_other_mode, r"in 'dbb' mode; this controller takes .* in 'online' mode"),
    (_unknown_parameter, r"optimizer holds parameters the model lacks: \['neck.nowhere.weight'\]"),
    (_other_watched_sites, r"only in the state: \['backbone.layer9.conv'\]"),
]


def _values(runner, model) -> dict:
    """Copies of every parameter and buffer value and of the optimizer's state and groups."""
    optimizer = runner.optim_wrapper.optimizer
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict())}


def _assert_same_values(got: dict, want: dict, what: str) -> None:
    assert list(got["model"]) == list(want["model"]), what
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), (what, key)
    assert_same(got["optimizer"], want["optimizer"], what)


def test_checkpoint_that_does_not_fit_fails_naming_the_difference_and_changes_nothing(resumed, fresh_runner):
    runner, checkpoint = fresh_runner, load_mmengine_checkpoint(str(resumed.half_path))
    hook, model = find_hook(runner, "DyRepHook"), unwrap(fresh_runner.model)
    params = {n: id(p) for n, p in model.named_parameters()}
    groups = [[id(p) for p in g["params"]] for g in runner.optim_wrapper.optimizer.param_groups]
    values = _values(runner, model)
    for spoil, message in BAD_STATES:
        bad = copy.deepcopy(checkpoint)
        spoil(bad["dyrep_fx"])
        with pytest.raises(ValueError, match=message):
            hook.after_load_checkpoint(runner, bad)
        # the structure of the later targets / the optimizer layout / the watched sites failed after the
        # structure was rebuilt: it was put back, the very same Parameters included
        assert not api.blocks(model), spoil.__name__
        assert {n: id(p) for n, p in model.named_parameters()} == params, spoil.__name__
        assert [[id(p) for p in g["params"]] for g in runner.optim_wrapper.optimizer.param_groups] == groups
        _assert_same_values(_values(runner, model), values, spoil.__name__)
    # grown weights without the structure
    bad = {k: v for k, v in checkpoint.items() if k != "dyrep_fx"}
    with pytest.raises(ValueError, match=r"holds grown blocks \(e.g. '[\w.]+'\) but no 'dyrep_fx' structure"):
        hook.after_load_checkpoint(runner, bad)
    _assert_same_values(_values(runner, model), values, "no dyrep_fx entry")
    # and the checkpoint itself still loads into the same model after all these refusals
    hook.after_load_checkpoint(runner, checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert set(api.blocks(model)) >= set(checkpoint["dyrep_fx"]["history"][0]["grown"])


def test_resuming_with_other_targets_in_the_config_fails_before_training(resumed, deepforest_root, tmp_path):
    cfg = det_cfg(deepforest_root, tmp_path, RESUME_ITERS, 2, targets=["backbone"])
    cfg.resume, cfg.load_from = True, str(resumed.half_path)
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    expected = r"targets \['backbone', 'bbox_head', 'neck'\].*only in the checkpoint: \['bbox_head', 'neck'\]"
    with pytest.raises(ValueError, match=expected):
        runner.train()
    assert not api.blocks(runner.model) and runner.iter == 0


# -- mixed precision, accumulation, clipping ---------------------------------------------------------------
def amp_run(root: Path, work_dir: Path, loss_scale: float):
    cfg = det_cfg(root, work_dir, 4, 2)
    cfg.optim_wrapper.update(type="CpuAmpOptimWrapper", dtype="bfloat16", loss_scale=loss_scale)
    record, *probes = dyrep_probes(autocast=torch.bfloat16)
    return train_runner(cfg, *probes), record


def test_amp_saliency_is_unscaled_and_growth_under_autocast_keeps_the_function(deepforest_root, tmp_path):
    from mmengine.optim import AmpOptimWrapper

    runner, scaled = amp_run(deepforest_root, tmp_path / "scaled", 1024.0)
    assert isinstance(runner.optim_wrapper, AmpOptimWrapper)
    assert runner.optim_wrapper.loss_scaler.get_scale() == 1024.0
    reference, unscaled = amp_run(deepforest_root, tmp_path / "unscaled", 1.0)
    # Scaling by a power of two is exact: the saliency each step used is bitwise the one of the run without
    # loss scaling (not 1024 times it), and so are the decisions and the weights at the end.
    assert len(scaled["saliency"]) == len(unscaled["saliency"]) == 2
    for got, ref in zip(scaled["saliency"], unscaled["saliency"]):
        assert got == ref and any(ref.values())
    final, ref_final = runner.model.state_dict(), reference.model.state_dict()
    assert list(final) == list(ref_final) and all(torch.equal(final[k], ref_final[k]) for k in final)
    # Growth kept the function of the model under bf16 autocast. Measured here: at most 0.8% of the largest
    # output (bf16 rounds the re-assembled kernels), while doubling the new branches' scales right after the
    # growth (an uncompensated change of 1% of each branch) moves it by 4 to 5%.
    ctl = find_hook(runner, "DyRepHook").controller
    assert [e["unit"] for e in ctl.history if e["grown"]] == [2, 4]
    for before, after in zip(scaled["before"], scaled["after"]):
        assert len(before) == len(after) == 10
        for b, a in zip(before, after):
            assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    assert len(scaled["losses"]) == 4 and finite(scaled["losses"])
    assert optimizer_ids(runner) == {id(p) for p in runner.model.parameters() if p.requires_grad}


def test_gradient_accumulation_clip_grad_and_lr_schedules_with_paramwise_groups(deepforest_root, tmp_path):
    cfg = det_cfg(deepforest_root, tmp_path, 6, 4)
    cfg.optim_wrapper.update(accumulative_counts=2, clip_grad=dict(max_norm=1.0, norm_type=2))
    # the config's warm-up and, at the same time, a cosine decay (its scheduler keeps a base value per group)
    cfg.param_scheduler = [cfg.param_scheduler[0], dict(type="CosineAnnealingLR", T_max=12, by_epoch=False)]
    record, *probes = dyrep_probes()
    runner = train_runner(cfg, *probes)
    ctl = find_hook(runner, "DyRepHook").controller
    assert [e["unit"] for e in ctl.history] == [4] and ctl.history[0]["grown"]
    # the saliency collector counts optimizer steps (every 2nd iteration), not iterations
    assert record["counts"] == [0, 1, 1, 2, 0, 1]
    (new,) = record["new_params"]
    assert new and finite(record["losses"]) and len(record["losses"]) == 6
    model, optimizer = runner.model, runner.optim_wrapper.optimizer
    now = dict(model.named_parameters())
    assert {id(now[n]) for n in new} <= optimizer_ids(runner)
    # the accumulated step after the growth updated them (and gave them momentum)
    assert all("momentum_buffer" in optimizer.state[now[n]] for n in new)
    assert any(not torch.equal(v, now[n]) for n, v in new.items())
    grad_norms = runner.message_hub.get_scalar("train/grad_norm").data[0]
    assert finite(list(grad_norms)) and max(grad_norms) > 1.0  # the clip was active
    # paramwise_cfg gave every new parameter its own group; the schedules reached them where the others are
    assert len(optimizer.param_groups) > len(list(model.parameters())) - len(new)
    lr = optimizer.param_groups[0]["lr"]
    assert 0 < lr < 0.01 and all(g["lr"] == pytest.approx(lr, rel=1e-9) for g in optimizer.param_groups)
