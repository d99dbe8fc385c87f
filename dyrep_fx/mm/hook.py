"""``DyRepHook``: DyRep for mmpretrain / mmdet / mmseg training through one entry in ``custom_hooks``.

    custom_imports = dict(imports=["dyrep_fx.mm"], allow_failed_imports=False)
    custom_hooks = [dict(type="DyRepHook", targets=["backbone"], dyrep=dict(interval=1000, until=20000))]

``dyrep`` holds :class:`dyrep_fx.DyRep`'s options, its policies as config entries
(:mod:`~dyrep_fx.mm.dyrep_options`: ``candidates=dict(type=...)``, ``criterion=...``, ``metric=...``).

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
  schedules where they are) and a DDP wrapper is rebuilt from ``model_wrapper_cfg``, its train step
  compiled again when the config sets ``compile``;
* ``before_val_epoch`` / ``after_val_epoch``: validate with the training BatchNorms' statistics
  re-estimated on ``calibrate_before_val`` training batches (:func:`dyrep_fx.calibrated`), so that
  validation sees what the weights compute rather than running averages that trail them; the running
  statistics are put back after validation (checkpoints and training are as without it);
* ``before_save_checkpoint``: put the structure and controller state into the checkpoint;
* ``after_run``: fold and save a deploy checkpoint that loads strictly into the unmodified config.

Saliency never needs ``after_train_iter``'s gradients (mmengine zeroes them inside
``update_params``): the controller reads them in an optimizer step pre-hook, unscaled under AMP.

The pieces the events use live beside the hook: :mod:`~dyrep_fx.mm.inputs` (side loader, example inputs),
:mod:`~dyrep_fx.mm.optim` (``paramwise_cfg`` groups, schedulers), :mod:`~dyrep_fx.mm.wrappers` (DDP
rebuild, ``compile``), :mod:`~dyrep_fx.mm.checkpoint` (the checkpoint entry, loading) and
:mod:`~dyrep_fx.mm.fold_checkpoint` (folding the targets).
"""

from __future__ import annotations

import os.path as osp
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import EMAHook, Hook
from mmengine.registry import HOOKS
from torch import nn

from .. import api, calibration
from ..controller import DyRep
from ..tracing import conv_modules
from .checkpoint import STATE_KEY, is_resuming, scope_checkpoint_loading
from .dyrep_options import DYREP_OPTIONS, build_dyrep_options, default_of
from .fold_checkpoint import fold_targets
from .inputs import capture_target_inputs, mm_forward, side_loader
from .optim import cover_new_groups, paramwise_chooser
from .wrappers import rewrap_runner_model, unwrap

__all__ = ["DyRepHook", "dyrep_block"]


@HOOKS.register_module()
class DyRepHook(Hook):
    """Grow and prune re-parameterization branches in the targets during mmengine training.

    Args:
        targets: submodules to re-parameterize (default ``["backbone"]``; e.g. add ``"neck"``).
        dyrep: the options of :class:`dyrep_fx.DyRep`, one block: any of its keyword arguments but those
            the hook supplies (the model, optimizer, targets and data), e.g. ``dict(interval=1000,
            until=20000, mode='online', metric='snip')``; the policies ``candidates``, ``criterion`` and
            ``metric`` also as config entries (``dict(type=...)`` through :data:`dyrep_fx.mm.POLICIES`, or a
            dotted import path), built and checked here, so one that does not build stops the run before
            training, named (:mod:`dyrep_fx.mm.dyrep_options`). ``interval`` counts iterations (epochs
            with ``by_epoch=True``) and defaults to 1000. The same options given as keyword arguments of
            the hook itself (the form before the block) are still accepted, with a deprecation warning.
        by_epoch: count epochs instead of iterations.
        deploy: at the end, fold and save ``deploy_filename`` (and ``ema_`` + it with an EMAHook)
            in ``work_dir``; it loads with ``strict=True`` into the model of the unmodified config.
        calibrate_before_val: validate with the statistics of every BatchNorm of the model that trains
            (frozen ones, e.g. ``norm_eval``, keep theirs) re-estimated as plain averages over this many
            training batches (0: off); the running statistics are put back after validation. Running averages trail the weights, and
            more so after growth in online mode: at 30 convs the sweep saw mid-training accuracy drop
            from ~80 % to ~30 % with running statistics while the same weights scored ~80 % with
            recomputed ones (``benchmarks/README.md``, "Online stability"). Skipped, with a warning,
            when an ``EMAHook`` swaps its averaged weights in for validation.
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
        dyrep: Mapping[str, Any] | None = None,
        by_epoch: bool = False,
        deploy: bool = True,
        deploy_filename: str = "dyrep_deploy.pth",
        trust_checkpoint: bool = True,
        calibrate_before_val: int = 20,
        **flat_options: Any,
    ) -> None:
        if calibrate_before_val < 0:
            raise ValueError(f"DyRepHook: calibrate_before_val must be >= 0 batches, got {calibrate_before_val}")
        self.targets = list(targets)
        self.calibrate_before_val = calibrate_before_val
        self._warned_ema = False
        self._validation_stack = ExitStack()
        self.trust_checkpoint = trust_checkpoint
        self.by_epoch = by_epoch
        self.deploy = deploy
        self.deploy_filename = deploy_filename
        #: ``DyRep``'s keyword arguments (the ``dyrep`` block with its policies built).
        self.dyrep_options = build_dyrep_options(dyrep_block(dyrep, flat_options))
        self.controller: DyRep | None = None

    @property
    def seed(self) -> int:
        """The run's DyRep seed (also seeds the side loaders of calibration and validation)."""
        return self.dyrep_options.get("seed", default_of("seed"))

    # -- set-up ------------------------------------------------------------------------------------
    def _controller(self, runner) -> DyRep:
        if self.controller is not None:
            return self.controller
        model = unwrap(runner.model)
        missing = [t for t in self.targets if not hasattr(model, t.split(".")[0])]
        if missing:
            raise ValueError(f"DyRepHook targets {missing} are not submodules of {type(model).__name__}")
        _refuse_convless_targets(model, self.targets)
        side = side_loader(runner.train_dataloader, self.seed)
        inputs = capture_target_inputs(model, next(iter(side)), self.targets)
        chooser = paramwise_chooser(runner.cfg.get("optim_wrapper"))
        extra = {"group_chooser": chooser} if chooser is not None else {}
        self.controller = DyRep(model, runner.optim_wrapper.optimizer, targets=self.targets,
                                example_inputs=inputs, calib_loader=side,
                                forward_fn=mm_forward, **self.dyrep_options, **extra)
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
        cover_new_groups(runner)  # a resume then loads the schedulers' saved state over this
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
            cover_new_groups(runner)
            self._rewrap(runner)
        self._publish(runner)

    def _publish(self, runner) -> None:
        blocks = api.blocks(self.controller.model)
        hub = runner.message_hub
        hub.update_scalar("train/dyrep_blocks", sum(1 for b in blocks.values() if b.grown))
        hub.update_scalar("train/dyrep_branches", sum(len(b.kinds) for b in blocks.values()))

    def _rewrap(self, runner) -> None:
        """DDP registers parameters at construction: rebuild the wrapper after a structural change
        (:func:`~dyrep_fx.mm.wrappers.rewrap_runner_model`), its train step compiled again under ``compile``."""
        compiled = rewrap_runner_model(runner)
        if compiled is None:
            return
        again = f"; compiled its {', '.join(compiled)} again" if compiled else ""
        runner.logger.info(f"DyRepHook: rebuilt the {type(runner.model).__name__} wrapper around the new "
                           f"structure{again}")

    # -- validation --------------------------------------------------------------------------------
    def before_val_epoch(self, runner) -> None:
        # mmengine's ValLoop calls this before switching the model to eval mode: the BatchNorms that
        # train are still recognisable by their flag.
        if not self.calibrate_before_val or self.controller is None:
            return
        if any(isinstance(hook, EMAHook) for hook in runner.hooks):
            if not self._warned_ema:
                runner.logger.warning("DyRepHook: calibrate_before_val skipped: an EMAHook validates its "
                                      "averaged weights, whose statistics these batches would not estimate")
                self._warned_ema = True
            return
        model = unwrap(runner.model)
        if not calibration.training_batchnorms(model):
            return
        # a loader seeded by the iteration: the same batches whether or not the run was resumed in between
        batches = side_loader(runner.train_dataloader, self.seed + runner.iter)
        used = self._validation_stack.enter_context(
            calibration.calibrated(model, batches, self.calibrate_before_val, mm_forward))
        runner.logger.info(f"DyRepHook: validating with BatchNorm statistics re-estimated on {used} training "
                           f"batches (the running ones are put back after validation)")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._validation_stack.close()

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


def _refuse_convless_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Stop before training when a listed target holds no convolution (a classifier's pooling neck or
    linear head): the user asked for DyRep there and would silently get none. Skipping it with a warning
    would let a config that means something else (a typo, the wrong head) train for days unnoticed."""
    convless = [t for t in targets if not conv_modules(model.get_submodule(t))]
    if convless:
        kinds = ", ".join(f"{t} ({type(model.get_submodule(t)).__name__})" for t in convless)
        raise ValueError(f"DyRepHook targets hold no convolution, nothing to re-parameterize: {kinds}; "
                         f"list only submodules with convs (e.g. 'backbone')")


def dyrep_block(dyrep: Mapping[str, Any] | None, flat_options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``dyrep`` block of a hook entry, with DyRep options given beside it (the form before the block,
    deprecated) merged in; an option given both ways, or a keyword the hook does not know, is refused."""
    unknown = sorted(set(flat_options) - set(DYREP_OPTIONS))
    if unknown:
        raise TypeError(f"DyRepHook got unexpected arguments {unknown}; DyRep's options go in dyrep=dict(...) "
                        f"(they are {list(DYREP_OPTIONS)})")
    block = dict(dyrep or {})
    twice = sorted(set(block) & set(flat_options))
    if twice:
        raise ValueError(f"DyRepHook: {twice} given both in dyrep=dict(...) and as hook arguments; keep one")
    if flat_options:
        warnings.warn(f"DyRepHook: DyRep options as hook arguments ({sorted(flat_options)}) are deprecated; "
                      f"give them as dyrep=dict(...)", DeprecationWarning, stacklevel=3)
    return {**block, **flat_options}
