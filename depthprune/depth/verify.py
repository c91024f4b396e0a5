"""Verification and rollback: Prune(f) is a transaction. A checkpoint logs every change (module
replacements, width-pruned parameters and buffers, graph states); a step that fails or leaves a
model that no longer runs or changes an output shape is rolled back and its unit blocked on
this structure; trials prune for scoring and put everything back.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..errors import UserError, one_line
from ..graph import module_path
from ..graph.build import default_forward
from .step import Step



class Transactions:
    """Checkpoints, rollback, trials and the check of a pruned model, for `DepthPruner`.
    Reads and restores ``self.model``, ``self.g``, ``self.steps``, ``self.companions``, the undo
    log and the structure version; uses the host's ``prune``."""

    model: nn.Module
    g: nx.DiGraph
    example_inputs: Any
    forward_fn: Callable | None
    on_change: Callable[[nn.Module], None] | None
    steps: list
    companions: list
    _output_shapes: list
    _listing: dict | None = None  # while candidates are listed: step signature -> what its run gave
    _undo: list | None
    _version: int
    _blocked: dict

    def output_shapes(self) -> list[tuple]:
        """Shapes of every tensor the traced forward returns on the example inputs."""
        with torch.no_grad():
            out = (self.forward_fn or default_forward)(self.model, self.example_inputs)
        return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

    def _check_step(self, step: Step, committing: bool) -> str | None:
        """Verification of a step (None: it holds). A step that will stay (``committing``) is
        always checked by running the model; a what-if step inside a trial or a promise is
        checked when its width changes went through index maps (concatenations, splits,
        reshapes, grouped convs), the only places where the plan is not exact by construction:
        the listing then never offers a unit that fails here. While candidates are listed
        (``_listing``: what each signature run so far gave) a promise also runs the model once per
        signature (`_signature`: the same attribute of the same class, the same plan): a
        stand-in the model's own code reads attributes of (a conv's ``stride``, a layer's
        ``weight``) or a width a fixed-size parameter needs breaks the model without any index
        map, and does so in every repeated block alike."""
        if committing or _reshapes(step.ops):
            return self._broken()
        if self._listing is not None:
            sig = self._signature(step)
            if sig not in self._listing:
                self._listing[sig] = self._broken()
            return self._listing[sig]
        return None

    def _signature(self, step: Step) -> tuple:
        """What a step does, up to which repeated block it does it in: per op, its kind, the
        stand-in state, and the class and attribute name of the module it touches (and of its
        parent)."""
        def where(path: str | None) -> tuple:
            if not path:
                return ()
            path = module_path(path)
            parent, _, attr = path.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            return type(owner).__name__, attr, type(self.model.get_submodule(path)).__name__
        ops = []
        for op in step.ops:
            if op["op"] == "width":
                ops.append(("width", tuple(where(p) + (d, len(i)) for p, d, i in op["items"])))
            else:
                ops.append((op["op"], op.get("with", {}).get("state"), where(op.get("module"))))
        return step.kind, where(self.g.nodes[step.unit]["module"]), tuple(ops)

    def _broken(self) -> str | None:
        """None when the model runs and keeps its output shapes, else what is wrong."""
        try:
            shapes = self.output_shapes()
        except Exception as e:  # any failure of the pruned model's forward is the answer
            where = self._failing_layer()
            if where is not None and not self._traced(where):
                return (f"it changes a width read by a layer the traced output does not depend on (such as "
                        f"{where}: the forward runs it, then drops its result), so that width cannot be repaired")
            return f"the pruned model does not run ({one_line(e)})"
        if shapes != self._output_shapes:
            return f"the pruned model changes its output shapes ({self._output_shapes} -> {shapes})"
        return None

    def _failing_layer(self) -> str | None:
        """The layer (a module holding parameters) inside which the model's forward on the
        example inputs fails; None when it runs or fails elsewhere."""
        names = {id(m): n for n, m in self.model.named_modules()}
        stack: list = []

        def enter(m, args) -> None:
            stack.append(m)

        def leave(m, args, out) -> None:  # returns None: the output stays as it is
            stack.pop()
        handles = []
        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
        try:
            with torch.no_grad():
                (self.forward_fn or default_forward)(self.model, self.example_inputs)
        except Exception:
            top = stack[-1] if stack else None
            if top is not None and any(True for _ in top.parameters(recurse=False)):
                return names.get(id(top))
        finally:
            for h in handles:
                h.remove()
        return None

    def _traced(self, path: str) -> bool:
        """Whether the module ``path`` is (inside) a node of the computation graph."""
        return any(n == path or path.startswith(n + ".") or n.startswith(path + "/") or d.get("module") == path
                   for n, d in self.g.nodes(data=True))  # a module traced as ops: nodes "path/op#i"

    def _block(self, unit: str, why: str) -> UserError:
        """Remember that `unit` cannot be pruned on the current structure (`why_not` and the
        listing say so until the structure changes); returns the error to raise."""
        self._blocked[unit] = (self._version, why)
        return UserError(f"cannot prune {unit}: {why}")

    def _checkpoint(self) -> "_Checkpoint":
        """Start logging changes (checkpoints nest: an inner one marks its place in the log)."""
        outer = self._undo is not None
        if not outer:
            self._undo = []
        return _Checkpoint(outer, len(self._undo), len(self.steps), self._version,
                           [c.snapshot() for c in self.companions])

    def _rollback(self, cp: "_Checkpoint") -> None:
        """Undo every change made since `cp` (modules, widths, graph states, plan, companions)."""
        log = self._undo
        for kind, where, what in reversed(log[cp.mark:]):
            if kind == "module":
                self.model.set_submodule(where, what)
            elif kind == "node":
                d = self.g.nodes[where]
                for key, value in what.items():
                    if value is None:
                        d.pop(key, None)
                    else:
                        d[key] = value
            else:
                _restore_state(where, what)
        changed = len(log) > cp.mark
        del log[cp.mark:]
        del self.steps[cp.n_steps:]
        self._version = cp.version
        for c, state in zip(self.companions, cp.companions):
            c.restore(state)
        if not cp.outer:
            self._undo = None
        if changed and self.on_change is not None:
            self.on_change(self.model)

    def _release(self, cp: "_Checkpoint") -> None:
        """Keep the changes made since `cp` (an enclosing checkpoint can still undo them)."""
        if not cp.outer:
            self._undo = None

    @contextmanager
    def trial(self, units: Iterable[str]):
        """Prune ``units`` for the duration of the ``with`` block, then put everything back
        (modules, graph states, plan, companions). Yields the steps; raises `UserError` (after
        rolling back) when a unit cannot be pruned."""
        if self._undo is not None:
            raise RuntimeError("trials do not nest")
        cp = self._checkpoint()
        try:
            yield [self.prune(u) for u in units]
        finally:
            self._rollback(cp)


@dataclass
class _Checkpoint:
    outer: bool          # inside another checkpoint: its log goes on
    mark: int            # length of the undo log when it was taken
    n_steps: int
    version: int
    companions: list


def _reshapes(ops: list[dict]) -> bool:
    """Ops whose shape effects the graph alone does not guarantee: width pruning through
    concat/split index mappings, or a concatenation operand emptied."""
    return any(op.get("maps_indices") or op.get("with", {}).get("state") == "empty" for op in ops)


def _module_state(module: nn.Module) -> dict:
    """What channel pruning changes on a module: plain attributes (widths), and the parameter
    and buffer objects with their data (BatchNorm's running statistics are buffers)."""
    plain = {k: v for k, v in module.__dict__.items() if isinstance(v, (int, float, tuple, list, str, bool))}
    params = {k: (p, p.data if p is not None else None) for k, p in module._parameters.items()}
    buffers = {k: (b, b.data if b is not None else None) for k, b in module._buffers.items()}
    return {"plain": plain, "_parameters": params, "_buffers": buffers}


def _restore_state(module: nn.Module, state: dict) -> None:
    """Put back what `_module_state` recorded, in place (the same parameter objects)."""
    module.__dict__.update(state["plain"])
    for where in ("_parameters", "_buffers"):
        store = getattr(module, where)
        store.clear()
        for k, (t, data) in state[where].items():
            if t is not None:
                t.data = data
            store[k] = t
