"""DyRep's checkpoint state: what :meth:`DyRep.state_dict` saves (plain data), and the two ways back into
a freshly built model: :meth:`~CheckpointState.load_state_dict` resumes the run, :meth:`~CheckpointState.load_structure`
starts a new schedule on a grown structure (fine-tuning). A mixin of :class:`dyrep_fx.DyRep`: it reads the
controller's targets, EMA copies, optimizer, candidate rule, saliency interval and counters, and changes them in
the controller's one transaction.
"""

from __future__ import annotations

from typing import Any

from . import structure_spec
from .block import main_parameters
from .ema_copies import restore_targets
from .optim_sync import apply_layout, layout, sync_after_change
from .passes.base import PassError, Transaction
from .policies import growable_kinds
from .target_names import join_name

__all__ = ["CheckpointState"]


class CheckpointState:
    """``state_dict``, ``load_state_dict`` and ``load_structure`` of :class:`dyrep_fx.DyRep`."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the structure, counters, history (the applied plans), the candidate rule's records,
        the interval saliency and the optimizer layout."""
        return {
            "structures": {prefix: target.structure() for prefix, target in self.targets.items()},
            "units": self.units,
            "steps_done": self.steps_done,
            "history": self.history,
            "candidate_rule": self.candidate_rule.state_dict(),
            "saliency": self.saliency.state_dict(),
            "optimizer_layout": layout(self.optimizer, self.model),
        }

    @staticmethod
    def _candidate_rule_state(state: dict[str, Any]) -> dict[str, Any]:
        """The candidate rule's saved records; a state saved before rules were pluggable kept the default
        rule's birth records under ``"births"``."""
        if "candidate_rule" in state:
            return state["candidate_rule"]
        return {"births": state.get("births", {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the saved structure on this (fresh) model and restore counters and optimizer layout.

        Load the model's and optimizer's own state dicts after this call. A state that does not fit
        (other targets, mode, sites, branch kinds, optimizer parameters or watched sites) raises a
        ``ValueError`` naming what differs, and leaves the model, its EMA copies and the optimizer as
        they were.
        """
        structures = state["structures"]
        self._check_structures(structures)
        with self._transaction() as txn:
            self._restore_everywhere(structures, txn)
            apply_layout(self.optimizer, self.model, state["optimizer_layout"])
            self.candidate_rule.load_state_dict(self._candidate_rule_state(state))
            # The watched set as saved: the nesting gate reads branch values not loaded yet.
            growable = set(growable_kinds(self.sites(), self.kinds))
            self._watch([n for n in state["saliency"]["names"] if n in growable])
            self.saliency.load_state_dict(state["saliency"])
        self.units = state["units"]
        self.steps_done = state["steps_done"]
        self.history = list(state["history"])

    def load_structure(self, state: dict[str, Any]) -> None:
        """Rebuild the structure of a saved :meth:`state_dict` and start the schedule over (fine-tuning
        from a grown checkpoint, where :meth:`load_state_dict` is for resuming).

        The blocks are rebuilt on this (fresh) model and its EMA copies, so the checkpoint's grown weights
        load afterwards. What belonged to the run that saved the state is dropped: ``units`` and
        ``steps_done`` are 0 (the first step is due after ``interval`` units again), ``history`` and the
        candidate rule's records are empty (the loaded blocks count as grown outside this controller),
        and the interval saliency starts empty over the current candidates. The saved optimizer layout is
        ignored: the new Parameters join this optimizer's groups as grown ones do (``group_chooser``), so
        do not load the saved optimizer state after this call. A state that does not fit (other targets,
        mode, sites or branch kinds) raises a ``ValueError`` and changes nothing.
        """
        structures = state["structures"]
        self._check_structures(structures)
        sources = {join_name(prefix, name): main_parameters(self.model.get_submodule(join_name(prefix, name)))[0]
                   for prefix, spec in structures.items() for name in spec["sites"]}
        before = {id(p) for p in self.model.parameters()}
        with self._transaction() as txn:
            self._restore_everywhere(structures, txn)
            sync_after_change(self.optimizer, self.model, before, sources, self.group_chooser)
            self.candidate_rule.reset()
            self._watch(self.candidates())
        self.units = self.steps_done = 0
        self.history = []

    def _restore_everywhere(self, structures: dict[str, dict[str, Any]], txn: Transaction) -> None:
        """Rebuild the checked ``structures`` on the live model and every attached EMA copy, in ``txn``."""
        restore_targets(self.targets, structures, txn)
        self.emas.restore(structures, txn)

    def _check_structures(self, structures: dict[str, dict[str, Any]]) -> None:
        """Everything :func:`dyrep_fx.restore` would refuse, for every target, before any target changes."""
        saved, here = set(structures), set(self.targets)
        if saved != here:
            raise ValueError(f"checkpoint structure is for targets {sorted(saved)}, this controller has "
                             f"{sorted(here)} (only in the checkpoint: {sorted(saved - here)}, only here: "
                             f"{sorted(here - saved)})")
        for prefix, target in self.targets.items():
            spec, where = structures[prefix], f"target {prefix or 'model'!r}"
            if target.blocks() and target.structure()["sites"] != spec["sites"]:
                raise ValueError(f"{where} already has a different grown structure; "
                                 "load into a freshly built model")
            if spec.get("format") != structure_spec.FORMAT or spec.get("mode") != self.mode:
                raise ValueError(f"checkpoint structure of {where} is a {spec.get('format')!r} in "
                                 f"{spec.get('mode')!r} mode; this controller takes "
                                 f"{structure_spec.FORMAT!r} in {self.mode!r} mode")
            try:
                target.check_structure(spec)
            except PassError as exc:
                raise PassError(f"checkpoint structure of {where}: {exc}") from exc
