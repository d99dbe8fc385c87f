"""Every torchvision classification model: transform, grow everywhere, fold, strict load into a fresh model.

The model list comes from torchvision's own registry (nothing is hand-picked). Each model is built
with ``weights=None`` in float64 at a small input size (48 px, or the smallest size the model accepts;
ViTs get ``image_size`` = 2 patches), its BatchNorm statistics and affine parameters are randomised, and:

1. ``transform`` (online mode for every model; dbb mode for a small subset), eligible sites grow every
   kind that applies; the eval output equals the original's (max rel err <= 1e-9). Every eligible site
   grows when the kernel algebra fits a per-model budget; otherwise one site of every distinct conv
   geometry plus the cheapest others (see :func:`_growth_names`; ``DYREP_FX_ZOO_BUDGET=inf`` grows all);
2. every BatchNorm (the model's and the branches') and every branch scale is randomised again, so the
   grown function differs from the original, and ``fold`` must reproduce it exactly;
3. the folded ``state_dict`` loads with ``strict=True`` into a fresh instance from the same builder,
   which computes the same eval output.

Every model must transform, its untraceable parts reported. Only the models named in
:data:`CANNOT_TRACE`, each with the reason, may fail instead (with a clear dyrep_fx error: xfail); a
``TraceFailure`` / ``PassError`` from any other model fails its test, and a listed model that traces
fails too (remove it from the list). A summary of every model (traced or not, sites,
untraceable leaves, graph differences, time) is written to ``$DYREP_FX_ZOO_SUMMARY`` (default
``<tmpdir>/dyrep_fx_zoo_summary.json``) and printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
import time
from typing import Any

import pytest
import torch
import torchvision
from helpers.numerics import randomise_bns, rel_err
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import dyrep_fx
from dyrep_fx.passes.base import PassError
from dyrep_fx.tracing import TraceFailure

pytestmark = pytest.mark.slow

MODELS = torchvision.models.list_models(module=torchvision.models)
#: Models also run in dbb mode (branches with BatchNorms; exact in eval mode only).
DBB_SUBSET = ("resnet18", "mobilenet_v2", "regnet_x_400mf", "efficientnet_b0")
#: Models whose nested sites (the kxk conv inside a grown 1x1_kxk branch) grow too.
NESTED_SUBSET = ("resnet18", "mobilenet_v2")
#: Per-model budget for the kernel algebra of growth, in multiply-adds (see :func:`_growth_names`); the
#: models in DBB_SUBSET always grow everywhere. ``DYREP_FX_ZOO_BUDGET=inf`` grows every site of every model.
GROW_BUDGET = float(os.environ.get("DYREP_FX_ZOO_BUDGET", "4e8"))
#: Models torch.fx cannot trace at all, each with the reason it cannot; only these may xfail. Empty:
#: every torchvision classification model traces (with torch 2.14 / torchvision 0.29, 2026-12-02).
CANNOT_TRACE: dict[str, str] = {}
SMALL_SIDE = 48
TOL = 1e-9
#: Fold in place above this many parameters, to keep float64 memory bounded.
BIG_MODEL = 150_000_000

_SUMMARY: dict[str, Any] = {}


# -- building -------------------------------------------------------------------------------------------
def _builder_kwargs(name: str) -> dict[str, Any]:
    """Extra builder arguments: a small ``image_size`` for ViTs (2x2 patches), the init flag of Inception."""
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {}
    if builder.__module__ == "torchvision.models.vision_transformer":
        with torch.device("meta"):
            kwargs["image_size"] = 2 * builder(weights=None).patch_size
    if builder.__module__ in ("torchvision.models.inception", "torchvision.models.googlenet"):
        kwargs.update(aux_logits=True, init_weights=False)
    return kwargs


_BUILD_THREADS = torch.get_num_threads()


_INIT_FUNCTIONS = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]


@contextlib.contextmanager
def _no_random_init():
    """``torch.nn.init``'s in-place initialisers do nothing (parameters keep ``torch.empty`` contents), and
    tensors are created in float64.

    Only for the fresh instance that a strict ``load_state_dict`` then fills completely: random init of
    the big models is the slowest part of this file.
    """
    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FUNCTIONS}
    dtype = torch.get_default_dtype()
    for n in saved:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    torch.set_default_dtype(torch.float64)  # nothing to draw: build in float64 directly
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _build(name: str, kwargs: dict[str, Any], fresh: bool = False) -> nn.Module:
    """A float64 instance with seeded random init (drawn in float32, which is several times faster, with
    every intra-op thread), or, ``fresh=True``, without random init: the builder's own modules and buffers,
    with parameters to be filled by a strict ``load_state_dict``."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(_BUILD_THREADS)
    try:
        with _no_random_init() if fresh else contextlib.nullcontext():
            return torchvision.models.get_model_builder(name)(weights=None, **kwargs).double()
    finally:
        torch.set_num_threads(threads)


def _reference(name: str, model: nn.Module, kwargs: dict[str, Any], gen: torch.Generator):
    """Input and eval output: ``image_size`` when set, else 48 px if the model runs on it, else its minimum."""
    sides = [kwargs["image_size"]] if "image_size" in kwargs else [SMALL_SIDE]
    weights = list(torchvision.models.get_model_weights(name))[0]
    sides.append(max(SMALL_SIDE, *weights.meta["min_size"]))
    for i, side in enumerate(sides):
        x = torch.randn(1, 3, side, side, dtype=torch.float64, generator=gen)
        try:
            return x, _eval_out(model, x)
        except Exception:
            if i == len(sides) - 1:
                raise


# -- randomisation --------------------------------------------------------------------------------------
@torch.no_grad()
def _randomise_zero_linears(model: nn.Module, gen: torch.Generator) -> int:
    """Random weights for zero-initialised linear layers (torchvision's ViT heads), whose all-zero logits
    would make every comparison of outputs vacuous."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype) * 0.02)
            count += 1
    return count


@torch.no_grad()
def _randomise_scales(model: nn.Module, gen: torch.Generator) -> None:
    """Move every block's main scale and branch scales away from their growth-time values."""
    for block in dyrep_fx.blocks(model).values():
        if block.mode == "online" and block.grown:
            block.main_scale.copy_(torch.rand(block.main_scale.shape, generator=gen, dtype=torch.float64) * 0.4 + 0.8)
        for branch in block.branches.values():
            if block.mode == "online":
                branch.scale.copy_(torch.rand(branch.scale.shape, generator=gen, dtype=torch.float64) * 0.2 - 0.1)




@torch.no_grad()
def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x)
    assert isinstance(out, torch.Tensor), type(out)
    return out


# -- the test -------------------------------------------------------------------------------------------
def _growth_names(name: str, model: nn.Module) -> list[str] | None:
    """The sites to grow: every eligible one (None) when the kernel algebra fits :data:`GROW_BUDGET`.

    Otherwise one site of every distinct geometry (the cheapest of each), then the cheapest others while
    the budget lasts. The cost of a site is its weight size times (kinds + C_in/groups): merging the
    ``1x1_kxk`` branch is a C_in/groups-deep contraction over the kernel, which dominates on wide convs
    (regnet_y_128gf's 1x1 convs are 7392 channels wide).
    """
    eligible = [s for s in dyrep_fx.sites(model) if s.eligible and s.depth == 0 and s.kinds]

    def cost(site) -> float:
        deep = site.in_channels // site.groups if "1x1_kxk" in site.kinds else 0
        return model.get_submodule(site.name).weight.numel() * (len(site.kinds) + deep)

    if name in DBB_SUBSET or sum(cost(s) for s in eligible) <= GROW_BUDGET:
        return None
    by_geometry: dict[tuple, Any] = {}
    for site in sorted(eligible, key=cost):
        key = (site.kernel_size, site.stride, str(site.padding), site.dilation, site.groups == 1,
               site.groups == site.in_channels, site.in_channels == site.out_channels, site.bias,
               site.next_bn is not None)
        by_geometry.setdefault(key, site)
    chosen = list(by_geometry.values())
    spent = sum(cost(s) for s in chosen)
    for site in sorted(eligible, key=cost):
        if site not in chosen and spent + cost(site) <= GROW_BUDGET:
            chosen.append(site)
            spent += cost(site)
    return [s.name for s in eligible if s in chosen]


def _check_untraceable_reported(model: nn.Module) -> None:
    state = dyrep_fx.api.state_of(model)
    for site in dyrep_fx.sites(model):
        leaf = state.traced.leaf_containing(site.name)
        if leaf is not None:
            assert not site.eligible and leaf in site.reason, (site.name, site.reason)


def _run(name: str, mode: str, info: dict[str, Any]) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    kwargs = _builder_kwargs(name)
    model = _build(name, kwargs)
    gen = torch.Generator().manual_seed(1)
    n_bns = sum(isinstance(m, _BatchNorm) and m.running_mean is not None for m in model.modules())
    randomise_bns(model, seed=1)
    _randomise_zero_linears(model, gen)
    original_keys = list(model.state_dict().keys())
    original_class = type(model)
    x, ref = _reference(name, model, kwargs, gen)
    info.update(input=x.shape[-1], kwargs=dict(kwargs), bns=n_bns, build_s=round(time.perf_counter() - t0, 2))

    try:
        dyrep_fx.transform(model, mode=mode)
    except (TraceFailure, PassError) as exc:
        msg = str(exc)
        assert msg and "Traceback" not in msg and len(msg.splitlines()) <= 3, msg
        info.update(traced=False, reason=f"{type(exc).__name__}: {msg}")
        if name not in CANNOT_TRACE:
            pytest.fail(f"{name} ({mode}) did not transform and is not in CANNOT_TRACE: {info['reason']}")
        return
    if name in CANNOT_TRACE:
        pytest.fail(f"{name} transforms now: remove it from CANNOT_TRACE ({CANNOT_TRACE[name]})")
    state = dyrep_fx.api.state_of(model)
    found = dyrep_fx.sites(model)
    eligible = [s for s in found if s.eligible]
    info.update(
        traced=True, root_traced=state.traced.root_traced, untraceable=dict(state.traced.untraceable),
        graph_differs_in_eval=state.traced.graph_differs_in_eval, sites=len(found), eligible=len(eligible),
        ineligible={s.name: s.reason for s in found if not s.eligible},
    )
    _check_untraceable_reported(model)
    assert eligible, f"{name}: no eligible site ({info['ineligible']})"
    assert type(model) is original_class

    # 1. grow every eligible site with every kind that applies: the function is kept exactly.
    names = _growth_names(name, model)
    t_grow = time.perf_counter()
    report = dyrep_fx.grow(model, names)
    grown_sites = list(report.changed)
    info["grown"] = len(grown_sites)
    assert grown_sites, report
    if names is None:
        assert set(grown_sites) == {s.name for s in eligible if s.kinds}
    for site_name, block in dyrep_fx.blocks(model).items():
        if site_name in grown_sites:
            assert block.kinds == next(s.kinds for s in found if s.name == site_name)
    if name in NESTED_SUBSET:
        inner = [s.name for s in dyrep_fx.sites(model) if s.depth == 1 and s.eligible]
        assert inner
        dyrep_fx.grow(model, inner)
        info["nested_grown"] = len(inner)
    info["grow_s"] = round(time.perf_counter() - t_grow, 2)
    grown_out = _eval_out(model, x)
    info["grown_fwd_s"] = round(time.perf_counter() - t_grow - info["grow_s"], 2)
    info["grow_rel"] = rel_err(grown_out, ref)
    assert info["grow_rel"] <= TOL, f"{name} ({mode}): growth changed the function: {info['grow_rel']:.3g}"
    del grown_out, ref

    # 2. move the grown model away from the original, then fold: exact.
    randomise_bns(model, seed=2)
    _randomise_scales(model, gen)
    grown_ref = _eval_out(model, x)
    big = sum(p.numel() for p in model.parameters()) > BIG_MODEL
    t_fold = time.perf_counter()
    folded = dyrep_fx.fold(model, inplace=big)
    info["fold_s"] = round(time.perf_counter() - t_fold, 2)  # in place for giants, to keep memory bounded
    if not big:
        del model
    gc.collect()
    assert not dyrep_fx.blocks(folded)
    assert type(folded) is original_class
    assert list(folded.state_dict().keys()) == original_keys
    info["fold_rel"] = rel_err(_eval_out(folded, x), grown_ref)
    assert info["fold_rel"] <= TOL, f"{name} ({mode}): fold changed the function: {info['fold_rel']:.3g}"
    folded_state = folded.state_dict()
    del folded
    gc.collect()

    # 3. a fresh instance from the same builder loads the folded weights strictly and computes the same.
    fresh = _build(name, kwargs, fresh=True)
    fresh.load_state_dict(folded_state, strict=True)
    del folded_state
    info["fresh_rel"] = rel_err(_eval_out(fresh, x), grown_ref)
    assert info["fresh_rel"] <= TOL, f"{name} ({mode}): fresh instance differs: {info['fresh_rel']:.3g}"
    info["seconds"] = round(time.perf_counter() - t0, 2)
    info["cpu_seconds"] = round(time.process_time() - c0, 2)


def _summary_path() -> str:
    return os.environ.get("DYREP_FX_ZOO_SUMMARY", os.path.join(tempfile.gettempdir(), "dyrep_fx_zoo_summary.json"))


def _write_summary() -> None:
    with open(_summary_path(), "w") as f:
        json.dump(_SUMMARY, f, indent=1, default=str)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: float64 grouped/depthwise convs on CPU run one small parallel region per group,
    which with two threads is 10-30x slower than with one (and far worse on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def _zoo_summary():
    yield
    _write_summary()
    path = _summary_path()
    traced = sorted(k for k, v in _SUMMARY.items() if v.get("traced"))
    failed = {k: v.get("reason") for k, v in _SUMMARY.items() if v.get("traced") is False}
    errors = {k: v["error"] for k, v in _SUMMARY.items() if "error" in v}
    partial = {k: sorted(v["untraceable"]) for k, v in _SUMMARY.items() if v.get("untraceable")}
    differs = sorted(k for k, v in _SUMMARY.items() if v.get("graph_differs_in_eval"))
    print(f"\nzoo summary ({path}): {len(traced)} traced, {len(failed)} not traced")
    for k, why in failed.items():
        print(f"  not traced {k}: {why}")
    for k, leaves in partial.items():
        print(f"  untraceable parts of {k}: {leaves}")
    for k, err in errors.items():
        print(f"  test failed {k}: {err}")
    print(f"  graph differs in eval mode: {differs}")


CASES = [pytest.param(n, "online", id=f"{n}-online") for n in MODELS] + [
    pytest.param(n, "dbb", id=f"{n}-dbb") for n in DBB_SUBSET if n in MODELS
]


def test_registry_is_not_empty():
    assert len(MODELS) >= 70, MODELS
    assert set(DBB_SUBSET) <= set(MODELS)


@pytest.mark.parametrize("name, mode", CASES)
def test_zoo_model(name: str, mode: str):
    info: dict[str, Any] = {}
    _SUMMARY[f"{name}/{mode}"] = info
    try:
        _run(name, mode, info)
    except BaseException as exc:
        info.setdefault("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise
    finally:
        gc.collect()
        _write_summary()
    if not info["traced"]:  # only models in CANNOT_TRACE get here (see _run)
        pytest.xfail(f"{name} cannot be traced ({CANNOT_TRACE[name]}): {info['reason']}")
