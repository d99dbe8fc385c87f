"""``DyRepHook``: DyRep for mmdet / mmseg training through one entry in ``custom_hooks``.

    custom_imports = dict(imports=["dyrep_fx.mm"], allow_failed_imports=False)
    custom_hooks = [dict(type="DyRepHook", targets=["backbone"], interval=1000)]

Events used:

* ``before_run``: under torch >= 2.6, let mmengine's own ``load_or_resume`` unpickle its checkpoint
  (``trust_checkpoint``; see :mod:`dyrep_fx.mm.checkpoint`), for that call only;
* ``after_load_checkpoint`` (resume / load_from of a DyRep checkpoint): rebuild the saved structure
  before mmengine loads the weights and optimizer state into it; with ``resume=True`` also the
  controller's counters, history, interval saliency and optimizer layout, with ``load_from`` alone only
  the structure (the schedule starts over; see :class:`DyRepHook`); a checkpoint that does not fit the
  config fails there, naming what differs, with the model and optimizer left as they were;
* ``before_train``: trace the targets (after weights are initialised or loaded) and start the
  controller; attach the EMA model of an ``EMAHook``;
* ``after_train_iter`` / ``after_train_epoch``: one controller step per unit; after a change the
  optimizer is updated in place (honouring ``paramwise_cfg``; new groups join the parameter
  schedules where they are) and a DDP wrapper is rebuilt from ``model_wrapper_cfg``;
* ``before_save_checkpoint``: put the structure and controller state into the checkpoint;
* ``after_run``: fold and save a deploy checkpoint that loads strictly into the unmodified config.

Saliency never needs ``after_train_iter``'s gradients (mmengine zeroes them inside
``update_params``): the controller reads them in an optimizer step pre-hook, unscaled under AMP.
"""

from __future__ import annotations

import copy
import os.path as osp
from collections.abc import Callable, Sequence
from typing import Any

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn
from torch.utils.data import DataLoader

from .. import api
from ..controller import DYREP_KINDS, DyRep
from ..defaults import INIT_SCALE, STD_GATE, THRESHOLD
from ..saliency import DEFAULT_METRIC
from ..tracing import set_training_flags
from .checkpoint import mmengine_checkpoint_loading

__all__ = ["DyRepHook", "capture_target_inputs", "is_resuming", "scope_checkpoint_loading"]

STATE_KEY = "dyrep_fx"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def mm_forward(model: nn.Module, batch: Any) -> Any:
    """Forward an mmengine data batch through the model in ``tensor`` mode (for BN calibration)."""
    data = model.data_preprocessor(batch, True)
    return model(**data, mode="tensor")


def _recording_forward(forward: Callable[..., Any], name: str, captured: dict[str, tuple]) -> Callable[..., Any]:
    def record(*args: Any, **kwargs: Any) -> Any:
        captured.setdefault(name, tuple(args))
        return forward(*args, **kwargs)

    return record


def capture_target_inputs(model: nn.Module, batch: Any, targets: Sequence[str],
                          forward_fn: Callable[[nn.Module, Any], Any] = mm_forward) -> dict[str, tuple]:
    """The positional inputs each target submodule receives on one batch (eval mode, no grad).

    ``forward_fn(model, batch)`` runs the model (default: :func:`mm_forward`). The heads of mmdet's and
    mmseg's ``mode='tensor'`` path are called as ``head.forward(x)``, which runs no forward hooks, so each
    target's ``forward`` is wrapped on the instance for this one pass (and put back afterwards). A target
    the pass does not reach is missing from the result.
    """
    captured: dict[str, tuple] = {}
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for name in targets:
            module = model.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _recording_forward(module.forward, name, captured)
        flags = set_training_flags(model, False)
        try:
            with torch.no_grad():
                forward_fn(model, batch)
        finally:
            set_training_flags(model, flags)
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own
    return captured


def side_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A second loader over the training set, for the example batch and BN calibration.

    Iterating the runner's own loader outside its loop would break it: mmengine's
    ``InfiniteSampler`` yields from one generator for the whole run, and a dropped iterator closes it.
    """
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                      collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(seed))


class _ParamwiseChooser:
    """Put each new Parameter in its own group built by the config's optimizer constructor.

    mmengine builds one group per Parameter when ``paramwise_cfg`` is set (``norm_decay_mult``,
    ``bias_decay_mult``, ``custom_keys``...); new Parameters get the same treatment. Branch scales
    stand in for the BatchNorm gammas of DBB, so they take ``norm_decay_mult`` like norm weights.
    The new group then joins the schedules where the group of the conv it grew from has got to.
    """

    def __init__(self, optim_wrapper_cfg: dict) -> None:
        cfg = copy.deepcopy(dict(optim_wrapper_cfg))
        self.paramwise_cfg = cfg.pop("paramwise_cfg", None) or {}
        ctor_type = cfg.pop("constructor", "DefaultOptimWrapperConstructor")
        self.constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(
            dict(type=ctor_type, optim_wrapper_cfg=cfg, paramwise_cfg=self.paramwise_cfg))

    def __call__(self, optimizer, model, name, param, source_weight) -> int:
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        groups: list[dict] = []
        self.constructor.add_params(groups, owner, prefix=owner_name)
        group = next(g for g in groups if g["params"][0] is param)
        norm_mult = self.paramwise_cfg.get("norm_decay_mult")
        if name.rpartition(".")[2] in ("scale", "main_scale") and norm_mult is not None \
                and self.constructor.base_wd is not None:
            group["weight_decay"] = self.constructor.base_wd * norm_mult
        group["params"] = []
        optimizer.add_param_group(group)  # fills in the optimizer's defaults (the base lr...)
        ref = next((g for g in optimizer.param_groups if any(p is source_weight for p in g["params"])),
                   optimizer.param_groups[0])
        _follow_schedules(optimizer.param_groups[-1], ref)
        return len(optimizer.param_groups) - 1


def _follow_schedules(group: dict, ref: dict) -> None:
    """Give a group added mid-run the values mmengine's parameter schedulers would have given it by now.

    A scheduler keeps each group's starting value as ``initial_<name>`` and updates the current value
    relative to itself (warm-up factors, decay steps), so a group built from the config's base values
    would otherwise run at the base lr (say 10x the decayed one) or warm up all over again. The group's
    values are scaled by ``ref``'s progress (current / initial) and its base values become its initial ones.
    """
    for key in [k for k in ref if k.startswith("initial_")]:
        name = key[len("initial_"):]
        if name in group and key not in group:
            group[key] = group[name]
            if ref[key]:
                group[name] = group[name] * ref[name] / ref[key]


def _cover_new_groups(runner) -> None:
    """Schedulers that keep one base value per group (cosine annealing) must know the groups added since.

    They pair ``base_values`` with the groups of what they schedule by position, and mmengine's
    ``OptimWrapper`` lists its ``base_param_settings`` after the optimizer's own groups, so the values
    are rebuilt in that order from each group's ``initial_<name>`` (what they were first built from).
    """
    schedulers = runner.param_schedulers or []
    if isinstance(schedulers, dict):
        schedulers = [s for group in schedulers.values() for s in group]
    wrapper = runner.optim_wrapper
    for scheduler in schedulers:
        target = getattr(scheduler, "optimizer", None)
        if target not in (wrapper, wrapper.optimizer) or not hasattr(scheduler, "base_values"):
            continue
        groups = target.param_groups
        if len(scheduler.base_values) != len(groups):
            key = f"initial_{scheduler.param_name}"
            scheduler.base_values = [g.get(key, g[scheduler.param_name]) for g in groups]


@HOOKS.register_module()
class DyRepHook(Hook):
    """Grow and prune re-parameterization branches in the targets during mmengine training.

    Args:
        targets: submodules to re-parameterize (default ``["backbone"]``; e.g. add ``"neck"``).
        interval: a DyRep step every ``interval`` iterations (or epochs with ``by_epoch=True``).
        by_epoch: count epochs instead of iterations.
        until: no growth or cut after this many units (default: never stop).
        topk, kinds, metric, nested, pointwise, std_gate, threshold, calib_batches, seed: see
            :class:`dyrep_fx.DyRep`.
        mode: ``"online"`` (one conv per site) or ``"dbb"`` (branches with BatchNorms).
        init_scale: initial scale of new branches.
        deploy: at the end, fold and save ``deploy_filename`` (and ``ema_`` + it with an EMAHook)
            in ``work_dir``; it loads with ``strict=True`` into the model of the unmodified config.
        trust_checkpoint: under torch >= 2.6, let mmengine unpickle the checkpoint it resumes or loads
            (``resume`` / ``load_from``), as it did before torch 2.6: mmengine 0.10.7's checkpoints hold
            pickled objects that ``weights_only`` loading refuses. Only for checkpoints you trust; with
            ``False`` run under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` yourself to resume.

    Checkpoints: every checkpoint gets the structure and the controller's state under ``"dyrep_fx"``.
    Loading one of them (in ``after_load_checkpoint``, before mmengine loads the weights):

    * ``resume=True`` (``load_from`` a checkpoint, or the latest one in ``work_dir``): the run goes on as
      if never stopped: the structure, the unit and step counters, the history, the saliency of the
      unfinished interval and the optimizer's group layout are restored, then mmengine loads the weights,
      the optimizer state and the schedulers (:meth:`dyrep_fx.DyRep.load_state_dict`).
    * ``load_from`` with ``resume=False`` (fine-tuning from a grown checkpoint): only the structure is
      rebuilt, so the grown weights load; DyRep's schedule starts over: units and steps at 0 (the first
      step is due after ``interval`` units again), empty history, no saliency carried over, and the new
      Parameters join this run's optimizer as grown ones do (mmengine loads no optimizer state then)
      (:meth:`dyrep_fx.DyRep.load_structure`). A folded deploy file (no ``"dyrep_fx"`` entry, no
      branches) loads as a plain checkpoint and training starts from the plain architecture.
    """

    priority = "ABOVE_NORMAL"  # before EMAHook, so the EMA model is synced before it averages

    def __init__(
        self,
        targets: Sequence[str] = ("backbone",),
        interval: int = 1000,
        by_epoch: bool = False,
        until: int | None = None,
        topk: int = 1,
        kinds: Sequence[str] | None = DYREP_KINDS,
        mode: str = "online",
        init_scale: float = INIT_SCALE,
        metric: str = DEFAULT_METRIC,
        nested: str = "gated",
        pointwise: bool = False,
        std_gate: float = STD_GATE,
        threshold: float = THRESHOLD,
        calib_batches: int = 20,
        seed: int = 0,
        deploy: bool = True,
        deploy_filename: str = "dyrep_deploy.pth",
        trust_checkpoint: bool = True,
    ) -> None:
        self.targets = list(targets)
        self.trust_checkpoint = trust_checkpoint
        self.by_epoch = by_epoch
        self.deploy = deploy
        self.deploy_filename = deploy_filename
        self.options = dict(interval=interval, until=until, topk=topk, kinds=None if kinds is None else list(kinds),
                            metric=metric, nested=nested, pointwise=pointwise, std_gate=std_gate, threshold=threshold, calib_batches=calib_batches,
                            seed=seed, mode=mode, init_scale=init_scale)
        self.controller: DyRep | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def _controller(self, runner) -> DyRep:
        if self.controller is not None:
            return self.controller
        model = _unwrap(runner.model)
        missing = [t for t in self.targets if not hasattr(model, t.split(".")[0])]
        if missing:
            raise ValueError(f"DyRepHook targets {missing} are not submodules of {type(model).__name__}")
        side = side_loader(runner.train_dataloader, self.options["seed"])
        inputs = capture_target_inputs(model, next(iter(side)), self.targets)
        optim_cfg = runner.cfg.get("optim_wrapper") or {}
        chooser = _ParamwiseChooser(optim_cfg) if optim_cfg.get("paramwise_cfg") else None
        extra = {"group_chooser": chooser} if chooser is not None else {}
        self.controller = DyRep(model, runner.optim_wrapper.optimizer, targets=self.targets,
                                example_inputs=inputs, calib_loader=side,
                                forward_fn=mm_forward, **self.options, **extra)
        self._log_sites(runner)
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and hasattr(hook, "ema_model"):
                self.controller.attach_ema(hook.ema_model.module)
        return self.controller

    def _log_sites(self, runner) -> None:
        sites = self.controller.sites()
        eligible = [s for s in sites if s.eligible]
        runner.logger.info(f"DyRepHook: {len(sites)} conv sites in {self.targets}, {len(eligible)} can grow "
                           f"({self.controller.mode} mode)")
        reasons: dict[str, int] = {}
        for s in sites:
            if not s.eligible:
                reasons[s.reason or ""] = reasons.get(s.reason or "", 0) + 1
        for reason, count in reasons.items():
            runner.logger.info(f"DyRepHook: {count} sites not grown: {reason}")

    def before_run(self, runner) -> None:
        if self.trust_checkpoint:
            scope_checkpoint_loading(runner)

    def before_train(self, runner) -> None:
        self._controller(runner)
        self._publish(runner)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            grown = [k for k in checkpoint.get("state_dict", {})
                     if ".branches." in k or k.endswith(".main_scale")]
            if grown:
                raise ValueError(f"DyRepHook: the checkpoint holds grown blocks (e.g. {grown[0]!r}) but no "
                                 f"{STATE_KEY!r} structure to rebuild them; was it saved without DyRepHook?")
            return
        ctl = self._controller(runner)
        resuming = is_resuming(runner)
        try:
            if resuming:
                ctl.load_state_dict(state)
            else:
                ctl.load_structure(state)
        except ValueError as exc:
            raise ValueError(f"DyRepHook (targets {self.targets}, {ctl.mode} mode): the checkpoint's "
                             f"{STATE_KEY!r} state does not fit this config, nothing was changed: "
                             f"{exc}") from exc
        _cover_new_groups(runner)  # a resume then loads the schedulers' saved state over this
        self._rewrap(runner)
        if resuming:
            how = f"resuming DyRep's schedule at unit {ctl.units} ({len(ctl.history)} steps taken)"
        else:
            how = (f"load_from without resume: DyRep's schedule starts over (the checkpoint's run had "
                   f"taken {len(state.get('history', []))} steps)")
        runner.logger.info(f"DyRepHook: restored the grown structure ({len(api.blocks(ctl.model))} blocks) "
                           f"before loading the checkpoint's weights; {how}")

    # -- steps -------------------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.by_epoch:
            self._step(runner)

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch:
            self._step(runner)

    def _step(self, runner) -> None:
        ctl = self._controller(runner)
        result = ctl.step()
        if not result.due:
            return
        for name, kinds in result.grown.items():
            runner.logger.info(f"DyRepHook unit {result.unit}: grew {name} with {', '.join(kinds)} "
                               f"(saliency {result.saliency.get(name, float('nan')):.4g})")
        for name, kinds in result.cut.items():
            runner.logger.info(f"DyRepHook unit {result.unit}: cut {', '.join(kinds)} from {name}")
        if result.changed:
            _cover_new_groups(runner)
            self._rewrap(runner)
        self._publish(runner)

    def _publish(self, runner) -> None:
        blocks = api.blocks(self.controller.model)
        hub = runner.message_hub
        hub.update_scalar("train/dyrep_blocks", sum(1 for b in blocks.values() if b.grown))
        hub.update_scalar("train/dyrep_branches", sum(len(b.kinds) for b in blocks.values()))

    def _rewrap(self, runner) -> None:
        """DDP registers parameters at construction: rebuild the wrapper after a structural change.

        The new wrapper comes from the config's ``model_wrapper_cfg`` as the runner built the first one;
        it broadcasts rank 0's parameters and buffers, which the controller has already made identical.
        """
        if not isinstance(runner.model, nn.parallel.DistributedDataParallel):
            return
        wrapper_cfg = copy.deepcopy(runner.cfg.get("model_wrapper_cfg"))
        runner.model = runner.wrap_model(wrapper_cfg, _unwrap(runner.model))
        runner.logger.info(f"DyRepHook: rebuilt the {type(runner.model).__name__} wrapper around the new "
                           "structure")

    # -- checkpoints -------------------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.controller is not None:
            checkpoint[STATE_KEY] = self.controller.state_dict()

    def after_run(self, runner) -> None:
        if not self.deploy or self.controller is None or not is_main_process():
            return
        path = osp.join(runner.work_dir, self.deploy_filename)
        self.save_deploy(self.controller.model, path)
        runner.logger.info(f"DyRepHook: folded deploy checkpoint written to {path}")
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and hasattr(hook, "ema_model"):
                ema_path = osp.join(runner.work_dir, "ema_" + self.deploy_filename)
                self.save_deploy(hook.ema_model.module, ema_path)
                runner.logger.info(f"DyRepHook: folded EMA deploy checkpoint written to {ema_path}")

    def save_deploy(self, model: nn.Module, path: str) -> None:
        """Fold a copy of ``model``'s targets and save ``{'meta', 'state_dict'}`` to ``path``."""
        deploy = fold_targets(model, self.targets)
        torch.save({"meta": {"dyrep_fx": "folded", "targets": self.targets},
                    "state_dict": deploy.state_dict()}, path)


def is_resuming(runner) -> bool:
    """Whether the runner's checkpoint load is a resume (``resume=True``) rather than a ``load_from``.

    mmengine 0.10.7's ``Runner.load_or_resume`` resumes exactly when the runner's ``resume`` argument
    (``cfg.resume``, kept as ``runner._resume``) is true, and loads ``load_from`` as weights otherwise; both
    go through ``Runner.load_checkpoint``, which fires ``after_load_checkpoint``.
    """
    flag = getattr(runner, "_resume", None)
    if flag is None:
        cfg = getattr(runner, "cfg", None)
        flag = cfg.get("resume", False) if cfg is not None else False
    return bool(flag)


def scope_checkpoint_loading(runner) -> None:
    """Run the runner's next ``load_or_resume`` (where mmengine loads ``resume`` / ``load_from``) inside
    :func:`mmengine_checkpoint_loading`; that call only, then the runner's own method is back.

    ``Runner.train`` / ``val`` / ``test`` call ``before_run`` and then ``load_or_resume``, and no hook
    event lies between them, so this is the narrowest scope a hook can give the switch.
    """
    previous = runner.__dict__.get("load_or_resume")
    original = runner.load_or_resume

    def load_or_resume():
        try:
            with mmengine_checkpoint_loading():
                return original()
        finally:
            if previous is None:
                runner.__dict__.pop("load_or_resume", None)
            else:
                runner.load_or_resume = previous

    runner.load_or_resume = load_or_resume


def fold_targets(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    """A deep copy of ``model`` with every transformed target folded back to its original architecture."""
    deploy = copy.deepcopy(_unwrap(model))
    for name in targets:
        target = deploy.get_submodule(name)
        if api.is_transformed(target):
            api.fold(target, inplace=True)
    return deploy
