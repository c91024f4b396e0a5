"""Prune(f): the depth-pruning engine (thesis Section 3.2, with the corrections in docs/algorithms.md).

One `DepthPruner` holds a model, its persistent computation graph and the plan of everything
applied. ``prune(unit)`` plans the operations of Prune(f) on the current model and applies
them; every operation is a JSON-serialisable dict, so a plan replays on a fresh base model.

This module composes the steps, each in its own module: `replace` (identity replacement),
`reconcile` (width reconciliation), `findops` (FindAct/FindNorm), `attention` (attention
collapse), `patch` (identity patching) and `verify` (verification, rollback and trials).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import networkx as nx
import torch.nn as nn

from .. import layers as K
from ..errors import UserError, one_line
from ..graph import CompGraph, forward_bounded_search, module_path, natural_key
from ..graph.search import LIVE
from .attention import AttentionCollapser
from .findops import ActNormFinder
from .fold import fold_batchnorm, foldable_pairs
from .identity import make_stand_in, run_plain_paths
from .patch import Patcher
from .reconcile import IndexScore, Reconciler, magnitude_score
from .replace import Replacer, _apply_to_graph
from .step import Step
from .verify import Transactions, _module_state


@dataclass
class Candidate:
    unit: str
    kind: str
    candidate: bool
    reason: str = ""
    params_removed: int = 0
    in_width: int = 0
    out_width: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def count_params(model: nn.Module) -> int:
    """All parameters, tied ones counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class DepthPruner(Replacer, Reconciler, ActNormFinder, AttentionCollapser, Patcher, Transactions):
    """A pruning session on one model.

    Args:
        model, example_inputs, forward_fn: the model and one traced forward.
        recipe: ``exclude`` (module paths), ``exclude_classes`` (class names),
            ``fold_batchnorm`` (fold Conv->BN pairs first), ``post_norm`` (``unit``: the norm
            right after a pruned transform goes with it, the default; ``keep``: it stays, the
            thesis read literally).
        index_score: importance of channel slices for width reconciliation.
        on_change: called with the model after each structural change (e.g. HF cache indices).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None,
                 recipe: dict | None = None, index_score: IndexScore = magnitude_score,
                 on_change: Callable[[nn.Module], None] | None = None, record_folds: bool = True):
        self.model = model.eval()
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.recipe = dict(recipe or {})
        if self.recipe.get("post_norm", "unit") not in ("unit", "keep"):
            raise UserError(f"recipe post_norm must be 'unit' or 'keep', not {self.recipe['post_norm']!r}")
        self._post_norm_in_unit = self.recipe.get("post_norm", "unit") == "unit"
        self.index_score = index_score
        self.on_change = on_change
        self.steps: list[Step] = []
        self.folds: list[list[str]] = []
        graph = CompGraph(model, example_inputs, forward_fn)
        if self.recipe.get("fold_batchnorm"):
            for conv, bn in foldable_pairs(graph.g, model):
                fold_batchnorm(model, conv, bn)
                self.folds.append([conv, bn])
            if self.folds:
                graph = CompGraph(model, example_inputs, forward_fn)
        self.graph = graph
        self.g: nx.DiGraph = graph.g
        self._output_shapes = self.output_shapes()  # what every pruned model must keep
        self._excluded = self._excluded_paths()
        #: structure version: a fresh number after every change, the old one back after a rollback
        self._version, self._next_version = 0, 1
        self._blocked: dict[str, tuple[int, str]] = {}  # unit -> (version, why it cannot be pruned)
        self._dgs: dict[int, Any] = {}  # version -> DepGraph of that structure, traced on demand
        self._undo: list | None = None  # undo log while a checkpoint is open
        #: objects told about every width pruning, before it happens:
        #: ``on_width(module, direction, idxs)``, plus ``snapshot()``/``restore(state)`` for trials
        self.companions: list = []

    @property
    def version(self) -> int:
        """Identifies the current structure: a fresh number after every change, the same one
        again after a trial or rollback returns to it (what a measurement on it stays valid for)."""
        return self._version

    def __getstate__(self) -> dict:
        # the cached DepGraph holds autograd objects that cannot be copied; it is re-traced on demand
        return {**self.__dict__, "_dgs": {}}

    # ------------------------------------------------------------------ candidates
    def _excluded_paths(self) -> list[str]:
        paths = list(self.recipe.get("exclude") or [])
        classes = set(self.recipe.get("exclude_classes") or [])
        for name, m in self.model.named_modules():
            if type(m).__name__ in classes:
                paths.append(name)
        return paths

    def _excluded_by(self, path: str) -> str | None:
        for p in self._excluded:
            if path == p or path.startswith(p + "."):
                return p
        return None

    def units(self) -> list[str]:
        return [n for n, d in self.g.nodes(data=True) if d["kind"] in K.UNIT_KINDS]

    def widths(self, unit: str) -> tuple[int, int]:
        return K.transform_widths(self.model.get_submodule(self.g.nodes[unit]["module"]))

    def why_not(self, unit: str) -> str | None:
        """None when `unit` can be pruned now, else the reason it cannot."""
        if unit not in self.g:
            raise UserError(f"no unit named {unit!r} in the graph")
        d = self.g.nodes[unit]
        if d["kind"] not in K.UNIT_KINDS:
            return f"a {d['kind']} node is not a unit (only transforms and attention are triggers)"
        if d["state"] != LIVE:
            return "already pruned"
        blocked = self._blocked.get(unit)
        if blocked is not None and blocked[0] == self._version:
            return blocked[1]
        if not d["module"]:
            calls = self.graph.module_calls[module_path(unit)]
            return f"shared: one module called {calls} times (at several depths)" if calls > 1 \
                else "not a replaceable module call"
        ex = self._excluded_by(d["module"])
        if ex is not None:
            return f"excluded by recipe ({ex})"
        m = self.model.get_submodule(d["module"])
        if any(not p.requires_grad for p in m.parameters()):
            return "frozen parameters"
        call = self.graph.calls.get(unit)
        if d["kind"] in K.COLLAPSED:
            if call is None or call.hidden_arg is None:
                return f"{d['kind']} output is not shaped like its input"
            if self._shares_outputs(unit):
                return "shares a value with other attention layers (a position bias passed from layer to layer)"
            return None
        if d["is_output"] or any(self.g.nodes[n]["is_output"] or self.g.nodes[n]["kind"] == K.OUTPUT
                                 for n in forward_bounded_search(self.g, unit)
                                 if self.g.nodes[n]["kind"] not in K.UNIT_KINDS):
            return "fixed-width model output"
        if call is None or call.in_shape is None or call.out_shape is None:
            return "shapes unknown (module not called in the trace)"
        cdim = 1 if isinstance(m, nn.modules.conv._ConvNd) else len(call.in_shape) - 1
        if len(call.in_shape) != len(call.out_shape) or any(
                a != b for i, (a, b) in enumerate(zip(call.in_shape, call.out_shape)) if i != cdim):
            return "changes spatial size"
        i, o = self.widths(unit)
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and i != o:
            return "grouped convolution that changes width"
        if self._parts(unit) * i > o and not any(self.g.nodes[n]["kind"] != K.OUTPUT
                                                 for n in self.g.predecessors(unit)):
            return "input width fixed by the model input"
        return None

    def candidates(self, with_params: bool = True) -> list[Candidate]:
        """Every unit with its kind and what pruning it alone would remove (or why it cannot).

        With ``with_params`` every candidate is pruned for real and rolled back (`promised_params`),
        so a unit listed as a candidate is one that prunes; a unit whose prune fails is listed
        with the reason."""
        out = []
        self._listing = {}
        try:
            for unit in sorted(self.units(), key=natural_key):
                reason = self.why_not(unit)
                i, o = self.widths(unit)
                c = Candidate(unit, self.g.nodes[unit]["kind"], reason is None, reason or "", 0, i, o)
                if reason is None and with_params:
                    try:
                        c.params_removed = self.promised_params(unit)
                    except UserError as e:
                        c.candidate, c.reason = False, self.why_not(unit) or str(e)
                out.append(c)
        finally:
            self._listing = None
        # Transforms hidden inside attention (and experts) units are listed with their reason.
        first = {}  # module -> its first call (a module shared across depths is called more than once)
        for p in self.graph.attention_paths:
            first.setdefault(module_path(p), p)
        for path, p in sorted(first.items(), key=lambda kv: natural_key(kv[0])):
            kind = self.graph.collapsed_kind(p)
            for name, m in self.model.get_submodule(path).named_modules():
                if K.is_transform_module(m):
                    out.append(Candidate(f"{path}.{name}", K.TRANSFORM, False, f"inside {kind} unit {path}"))
        return out

    def promised_params(self, unit: str) -> int:
        """Parameters Prune(unit) would remove from the current model.

        Measured, not simulated: Prune(unit) is applied (the same plan `prune` applies) and
        rolled back, so the promise is exactly the drop `prune` reports. Raises `UserError`
        when the unit cannot be pruned (and remembers why, for `why_not`)."""
        cp = self._checkpoint()
        try:
            return self.prune(unit).params_removed
        finally:
            self._rollback(cp)

    # ------------------------------------------------------------------ Prune(f)
    def prune(self, unit: str, score: float | None = None) -> Step:
        """Apply Prune(unit) and return the recorded step.

        Prune(f) is a transaction: when any operation fails, or the pruned model no longer runs
        or changes an output shape (`_check_step`), every change is rolled back, the unit is
        blocked on this structure (listed as a non-candidate with the reason) and `UserError`
        says why. The check is one forward on the example inputs; inside a trial or a promise it
        runs only for steps that map channels through concat/split/reshape/grouped convs or
        empty a concatenation."""
        reason = self.why_not(unit)
        if reason is not None:
            raise UserError(f"cannot prune {unit}: {reason}")
        cp = self._checkpoint()
        try:
            step = self._prune_unit(unit, score)
            problem = self._check_step(step, committing=not cp.outer)
        except UserError:
            self._rollback(cp)
            raise
        except (RuntimeError, ValueError, IndexError, KeyError, TypeError, AssertionError, ArithmeticError) as e:
            # a width change a layer pruner (or a torch-pruning index map) rejects: nothing of the step may stay
            step, problem = None, f"cannot be pruned consistently ({one_line(e)})"
        except BaseException:  # anything else (a bug, Ctrl-C): leave the model as it was
            self._rollback(cp)
            raise
        if problem is not None:
            self._rollback(cp)
            raise self._block(unit, problem)
        self._release(cp)
        return step

    def _prune_unit(self, unit: str, score: float | None) -> Step:
        """Prune(f) itself: width reconciliation, identity replacement, FindAct/FindNorm or
        attention collapse, identity patching."""
        before = count_params(self.model)
        ops = self._prune_ops(unit)
        step = Step(unit, self.g.nodes[unit]["kind"], before - count_params(self.model), ops, score)
        self.steps.append(step)
        return step

    def _prune_ops(self, unit: str) -> list[dict]:
        """The operations of Prune(unit), applied to the model and the graph as they are planned."""
        kind = self.g.nodes[unit]["kind"]
        ops: list[dict] = []
        if kind == K.TRANSFORM:
            fused = self.fused_split(unit)
            if self._needs_width(unit):
                for op in self._reconcile_ops(unit, self._trace()):
                    ops.append(self.apply(op))
                if self._needs_width(unit):
                    raise RuntimeError("the unit is not square after width reconciliation")
            if fused is None:
                ops.append(self.apply(self._replace_op(unit, "identity")))
            else:  # k fused transforms: each part of the cut is the input
                split, k, dim = fused
                ops.append(self.apply(self._replace_op(unit, "identity", repeat=k, dim=dim)))
                ops.append(self.apply({"op": "neutral", "node": split, "live_operand": unit}))
            for n in self._unit_norms(self.g, unit):
                ops.append(self.apply(self._replace_op(n, "identity")))
            T = {unit}
            for a in self._find_act(self.g, T):
                ops.append(self.apply(self._replace_op(a, "identity")))
            for n in self._find_norm(self.g, T):
                ops.append(self.apply(self._replace_op(n, "identity")))
        else:  # Algorithm 7: attention collapse
            ops += self._collapse_attention(unit)
        ops += self._patch()
        if kind in K.COLLAPSED:
            ops += self._residual_fallback(unit)
        if self.on_change is not None:
            self.on_change(self.model)
        return ops

    # ------------------------------------------------------------------ applying operations
    def apply(self, op: dict) -> dict:
        """Apply one plan operation to the model and the graph; returns it. Inside a checkpoint
        every change is logged so that `_rollback` can undo it."""
        kind = op["op"]
        if kind not in ("width", "replace", "neutral", "refit"):
            raise UserError(f"unknown plan operation {kind!r}")
        log = self._undo
        if kind == "width":
            for path, direction, idxs in op["items"]:
                module = self.model.get_submodule(path)
                if log is not None:
                    log.append(("state", module, _module_state(module)))
                for c in self.companions:
                    c.on_width(module, direction, idxs)
                K.prune_channels(module, direction, idxs)
        elif kind == "refit":
            pass  # compensation changed weights only; replaying structure has nothing to do
        else:
            if kind == "replace":
                if log is not None:
                    log.append(("module", op["module"], self.model.get_submodule(op["module"])))
                self.model.set_submodule(op["module"], make_stand_in(op["with"]))
                run_plain_paths(self.model, op["module"])
            if log is not None:
                d = self.g.nodes[op["node"]]
                log.append(("node", op["node"], {k: d.get(k) for k in ("state", "live_operand")}))
            _apply_to_graph(self.g, op)
        self._version, self._next_version = self._next_version, self._next_version + 1
        return op

    def replay(self, steps: Iterable[dict]) -> None:
        for s in steps:
            for op in s["ops"]:
                self.apply(op)
            self.steps.append(Step(s["unit"], s["kind"], s["params_removed"], s["ops"], s.get("score")))
        if self.on_change is not None:
            self.on_change(self.model)
