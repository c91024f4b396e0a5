"""Prune(f): the depth-pruning engine (thesis Section 3.2, with DESIGN.md's corrections).

One `DepthPruner` holds a model, its persistent computation graph and the plan of everything
applied. ``prune(unit)`` plans the operations of Prune(f) on the current model and applies
them; every operation is a JSON-serialisable dict, so a plan replays on a fresh base model.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .. import _tp
from ..errors import UserError
from ..graph import CompGraph, backward_bounded_search, follow_identity_operand, forward_bounded_search
from ..graph import kinds as K
from ..graph.build import default_forward, foreign_norm_classes, trace_dependency_graph
from ..graph.search import IDENTITY, LIVE, NEUTRAL, is_transparent
from .fold import fold_batchnorm, foldable_pairs
from .identity import make_stand_in

UNIT_KINDS = (K.TRANSFORM, K.ATTENTION)
NEUTRAL_OF = {"add": "zero", "mul": "one", "cat": "empty"}

#: ``index_score(module, direction, idxs) -> tensor[len(idxs)]``: importance of each channel
#: slice; the engine removes the lowest-scoring sections of the dependent layers.
IndexScore = Callable[[nn.Module, str, list], torch.Tensor]


def _channel_dim(module: nn.Module, direction: str, name: str) -> int | None:
    """The dimension of parameter ``name`` (weight or bias) that pruning channels in
    ``direction`` cuts; None when that parameter is untouched."""
    return K.channel_dim(module, direction, name)


def channel_slices(module: nn.Module, direction: str, idxs: list, tensors: dict | None = None) -> list[torch.Tensor]:
    """Parameter slices that pruning `idxs` in `direction` removes, one tensor per parameter,
    channel along dim 0. ``tensors`` (``{"weight": ..., "bias": ...}``, shaped like the
    parameters) are sliced instead when given, e.g. per-weight importance."""
    out = []
    idx = torch.as_tensor(idxs, dtype=torch.long)
    for name in ("weight", "bias"):
        t = tensors.get(name) if tensors is not None else getattr(module, name, None)
        dim = _channel_dim(module, direction, name)
        if not isinstance(t, torch.Tensor) or dim is None or t.dim() <= dim or t.shape[dim] <= max(idxs, default=0):
            continue
        out.append(t.detach().index_select(dim, idx).movedim(dim, 0))
    return out


def drop_channels(module: nn.Module, direction: str, idxs: list, tensors: dict) -> dict:
    """``tensors`` shaped like ``module``'s weight/bias, with the channels pruning removes dropped."""
    out = {}
    for name, t in tensors.items():
        dim = _channel_dim(module, direction, name)
        if t is None or dim is None:
            out[name] = t
            continue
        keep = torch.ones(t.shape[dim], dtype=torch.bool)
        keep[torch.as_tensor(idxs, dtype=torch.long)] = False
        out[name] = t[keep] if dim == 0 else t[:, keep]
    return out


def magnitude_score(module: nn.Module, direction: str, idxs: list) -> torch.Tensor:
    """Default index score: sum of squared weights of each channel's slice."""
    total = torch.zeros(len(idxs), dtype=torch.float64)
    for s in channel_slices(module, direction, idxs):
        total += s.double().pow(2).reshape(len(idxs), -1).sum(1)
    return total


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


@dataclass
class Step:
    unit: str
    kind: str
    params_removed: int
    ops: list = field(default_factory=list)
    score: float | None = None

    def as_dict(self) -> dict:
        d = {"unit": self.unit, "kind": self.kind, "params_removed": self.params_removed, "ops": self.ops}
        if self.score is not None:
            d["score"] = self.score
        return d


def count_params(model: nn.Module) -> int:
    """All parameters, tied ones counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class DepthPruner:
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
        self._norm_classes = foreign_norm_classes(model)
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
        return [n for n, d in self.g.nodes(data=True) if d["kind"] in UNIT_KINDS]

    def widths(self, unit: str) -> tuple[int, int]:
        return K.transform_widths(self.model.get_submodule(self.g.nodes[unit]["module"]))

    def why_not(self, unit: str) -> str | None:
        """None when `unit` can be pruned now, else the reason it cannot."""
        if unit not in self.g:
            raise UserError(f"no unit named {unit!r} in the graph")
        d = self.g.nodes[unit]
        if d["kind"] not in UNIT_KINDS:
            return f"a {d['kind']} node is not a unit (only transforms and attention are triggers)"
        if d["state"] != LIVE:
            return "already pruned"
        blocked = self._blocked.get(unit)
        if blocked is not None and blocked[0] == self._version:
            return blocked[1]
        if not d["module"]:
            return "not a replaceable module call"
        ex = self._excluded_by(d["module"])
        if ex is not None:
            return f"excluded by recipe ({ex})"
        m = self.model.get_submodule(d["module"])
        if any(not p.requires_grad for p in m.parameters()):
            return "frozen parameters"
        call = self.graph.calls.get(unit)
        if d["kind"] == K.ATTENTION:
            if call is None or call.hidden_arg is None:
                return "attention output is not shaped like its input"
            return None
        if d["is_output"] or any(self.g.nodes[n]["is_output"] or self.g.nodes[n]["kind"] == K.OUTPUT
                                 for n in forward_bounded_search(self.g, unit)
                                 if self.g.nodes[n]["kind"] not in UNIT_KINDS):
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

    def fused_split(self, unit: str) -> tuple[str, int, int] | None:
        """``(split node, k, dim)`` when the transform's output is cut into ``k >= 2`` equal parts
        along its channel dimension (``dim``, negative) and only that cut reads it: the unit is
        ``k`` fused transforms (a gate and an up projection in one weight). It is square when
        ``out == k * in``, and its identity repeats the input ``k`` times."""
        succ = list(self.g.successors(unit))
        if self.g.nodes[unit]["kind"] != K.TRANSFORM or len(succ) != 1:
            return None
        d = self.g.nodes[succ[0]]
        if d["kind"] != K.OTHER or d["state"] != LIVE or not d.get("split"):
            return None
        dim, ndim, sizes = d["split"]
        m = self.model.get_submodule(self.g.nodes[unit]["module"])
        channel = 1 if isinstance(m, nn.modules.conv._ConvNd) else ndim - 1
        if dim != channel or len(sizes) < 2 or len(set(sizes)) != 1:
            return None
        return succ[0], len(sizes), dim - ndim

    def _parts(self, unit: str) -> int:
        fused = self.fused_split(unit)
        return fused[1] if fused else 1

    def _needs_width(self, unit: str) -> bool:
        """True when Prune(unit) must first reconcile widths (the unit is not square)."""
        i, o = self.widths(unit)
        return o != self._parts(unit) * i

    def candidates(self, with_params: bool = True) -> list[Candidate]:
        """Every unit with its kind and what pruning it alone would remove (or why it cannot).

        With ``with_params`` every candidate is pruned for real and rolled back (`promised_params`),
        so a unit listed as a candidate is one that prunes; a unit whose prune fails is listed
        with the reason."""
        out = []
        for unit in sorted(self.units(), key=_natural):
            reason = self.why_not(unit)
            i, o = self.widths(unit)
            c = Candidate(unit, self.g.nodes[unit]["kind"], reason is None, reason or "", 0, i, o)
            if reason is None and with_params:
                try:
                    c.params_removed = self.promised_params(unit)
                except UserError as e:
                    c.candidate, c.reason = False, self.why_not(unit) or str(e)
            out.append(c)
        # Transforms hidden inside attention units are listed with their reason.
        for path in self.graph.attention_paths:
            for name, m in self.model.get_submodule(path).named_modules():
                if K.is_transform_module(m):
                    out.append(Candidate(f"{path}.{name}", K.TRANSFORM, False, f"inside attention unit {path}"))
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
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
            # a width change a layer pruner rejects: nothing of the step may stay
            step, problem = None, f"cannot be pruned consistently ({type(e).__name__}: {_first_line(e)})"
        except BaseException:  # anything else (a bug, Ctrl-C): leave the model as it was
            self._rollback(cp)
            raise
        if problem is not None:
            self._rollback(cp)
            raise self._block(unit, problem)
        self._release(cp)
        return step

    def _block(self, unit: str, why: str) -> UserError:
        """Remember that `unit` cannot be pruned on the current structure (`why_not` and the
        listing say so until the structure changes); returns the error to raise."""
        self._blocked[unit] = (self._version, why)
        return UserError(f"cannot prune {unit}: {why}")

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
            T = {unit}
            acts = self._find_act(self.g, T)  # before replacement: searches start at the unit
            ops.append(self.apply(self._replace_op(unit, "identity")))
            # a norm right after the attention (sandwich/post-norm) goes with it, as for transforms
            for n in self._unit_norms(self.g, unit):
                ops.append(self.apply(self._replace_op(n, "identity")))
            for a in acts:
                ops.append(self.apply(self._replace_op(a, "identity")))
            for n in self._find_norm(self.g, T):
                ops.append(self.apply(self._replace_op(n, "identity")))
        ops += self._patch()
        if self.on_change is not None:
            self.on_change(self.model)
        return ops

    # ------------------------------------------------------------------ verification
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
        the listing then never offers a unit that fails here."""
        if committing or _reshapes(step.ops):
            return self._broken()
        return None

    def _broken(self) -> str | None:
        """None when the model runs and keeps its output shapes, else what is wrong."""
        try:
            shapes = self.output_shapes()
        except Exception as e:  # any failure of the pruned model's forward is the answer
            return f"the pruned model does not run ({type(e).__name__}: {_first_line(e)})"
        if shapes != self._output_shapes:
            return f"the pruned model changes its output shapes ({self._output_shapes} -> {shapes})"
        return None

    def _unit_norms(self, g: nx.DiGraph, unit: str) -> list[str]:
        return self._trailing_norms(g, unit) if self._post_norm_in_unit else []

    @staticmethod
    def _trailing_norms(g: nx.DiGraph, unit: str) -> list[str]:
        """Post-norm layers (Conv -> BN -> act): a norm that is the unit's only consumer and has
        no other producer is part of the unit (DESIGN.md item 7)."""
        succ = list(g.successors(unit))
        if len(succ) == 1:
            d = g.nodes[succ[0]]
            if d["kind"] == K.NORM and d["state"] == LIVE and d["module"] and g.in_degree(succ[0]) == 1:
                return succ
        return []

    def _find_act(self, g: nx.DiGraph, T: set) -> list[str]:
        """FindAct (Alg. 1, corrected): activations after T whose bounded backward search reaches
        no live transform outside T."""
        found = []
        for a in sorted(forward_bounded_search(g, T)):
            d = g.nodes[a]
            if d["kind"] != K.ACTIVATION or d["state"] != LIVE or not d["module"]:
                continue
            reached = {n for n in backward_bounded_search(g, a)
                       if g.nodes[n]["kind"] in UNIT_KINDS and g.nodes[n]["state"] == LIVE}
            if reached <= T:
                found.append(a)
        return found

    def _find_norm(self, g: nx.DiGraph, T: set) -> list[str]:
        """FindNorm (Alg. 2, corrected): norms before T whose bounded forward search reaches no
        live transform outside T."""
        found = []
        for n in sorted(backward_bounded_search(g, T)):
            d = g.nodes[n]
            if d["kind"] != K.NORM or d["state"] != LIVE or not d["module"]:
                continue
            preds = list(g.predecessors(n))
            if len(preds) == 1 and self._trailing_norms(g, preds[0]) == [n] and \
                    g.nodes[preds[0]]["kind"] == K.TRANSFORM:
                continue  # a post-norm belongs to its own transform's unit, not to T's
            reached = {x for x in forward_bounded_search(g, n)
                       if g.nodes[x]["kind"] in UNIT_KINDS and g.nodes[x]["state"] == LIVE}
            if reached <= T:
                found.append(n)
        return found

    def _replace_op(self, node: str, state: str, **extra) -> dict:
        d = self.g.nodes[node]
        call = self.graph.calls.get(node)
        hidden = list(call.hidden_arg) if call is not None and call.hidden_arg else ["arg", 0]
        structure = call.out_structure if call is not None and call.out_structure else "tensor"
        if d["kind"] != K.ATTENTION:
            hidden, structure = ["arg", 0], "tensor"
        spec = {"state": state, "hidden_arg": hidden,
                "out_structure": list(structure) if isinstance(structure, tuple) else structure, **extra}
        return {"op": "replace", "node": node, "module": d["module"], "with": spec}

    # ------------------------------------------------------------------ width reconciliation
    def _trace(self):
        """DepGraph of the current structure. Rollbacks restore the module objects, so a trace
        stays valid for its version; the last two are kept (a trial's base and its inside)."""
        dg = self._dgs.get(self._version)
        if dg is None:
            dg = self._dgs[self._version] = trace_dependency_graph(self.model, self.example_inputs, self.forward_fn)
            while len(self._dgs) > 2:
                del self._dgs[next(iter(self._dgs))]
        return dg

    def _reconcile_ops(self, unit: str, dg) -> list[dict]:
        """Width-prune the unit's own pruning group until it is square (DESIGN.md, Prune step 2).

        One `ChannelGroup` of all the unit's channels in the pruned direction says which of
        them go together (one channel concatenated several times, as in SPPF; one group of a
        grouped conv; one offset of every `chunk` piece, as in C2f) and which cannot go at all
        (they reach a channel-mixing reshape or a fixed-size split); a class is removed whole.
        """
        i, o = self.widths(unit)
        parts = self._parts(unit)
        if parts * i < o:
            direction, k = "out", o - parts * i
        elif o % parts == 0:
            direction, k = "in", i - o // parts
        else:
            raise self._block(unit, f"its {o} output channels do not split into {parts} parts of equal width")
        module = self.model.get_submodule(self.g.nodes[unit]["module"])
        n = o if direction == "out" else i
        group = _tp.ChannelGroup(dg, module, direction, n)
        narrowed = sorted({type(m).__name__ for m, _, _, _ in group.layer_tables()
                           if isinstance(m, tuple(K.EMBEDDING_CLASSES))})
        if narrowed:  # the unit's width is the model's embedding width (the residual stream)
            raise self._block(unit, f"width reconciliation would narrow the embedding width "
                                    f"({', '.join(narrowed)}), i.e. the residual stream")
        classes, refused = group.classes()
        # Score each root over the *dependent* layers (the unit itself is removed anyway). Every
        # channel of a layer counts once, on one of its roots (they are all in one class), and
        # `takes` notes which layers each root takes a channel from.
        root_score = torch.zeros(n, dtype=torch.float64)
        takes: dict[int, list] = {}
        width: dict = {}
        for m, dr, idxs, reps in group.layer_tables():
            key = (id(m), dr)
            width[key] = _tp.channels(dg, m, dr)
            for r in reps:
                takes.setdefault(r, []).append(key)
            if m is not module:
                s = self.index_score(m, dr, idxs).double()
                root_score.index_add_(0, torch.as_tensor(reps, dtype=torch.long), s)
        per_root = root_score.tolist()  # plain floats: summing thousands of small classes as tensors is slow
        class_score = {c[0]: sum(per_root[j] for j in c) for c in classes}
        scored = sorted(classes, key=lambda c: (class_score[c[0]], c[0]))
        chosen = _choose_classes(scored, [class_score[c[0]] for c in scored], k, takes, width)
        if chosen is None:  # blocked on this structure, so `why_not` and the listing agree
            why = f"width reconciliation cannot remove exactly {k} {direction}put channels without emptying a layer"
            sizes = sorted({len(c) for c in classes})
            if sizes and sizes != [1]:
                why += f" (channels are tied in classes of {', '.join(map(str, sizes))})"
            for reason, count in sorted(refused.items()):
                why += f"; {count} of its {n} {direction}put channels cannot be removed: {reason}"
            raise self._block(unit, why)
        name_of = {m: p for p, m in self.model.named_modules()}
        items = [[name_of[m], dr, idxs] for m, dr, idxs in group.items(chosen)]
        return [{"op": "width", "unit": unit, "items": items, "maps_indices": group.maps_indices}]

    # ------------------------------------------------------------------ identity patching
    def _patch(self) -> list[dict]:
        """Identity patching (Eqs. 3.5-3.7) of add/mul/cat to a fixed point; returns the ops.

        Generalised beyond the thesis so that every residual form collapses:
        - an operand whose value is the operation's neutral element (a Zero for add, a One
          for mul) is ignored: an add/mul left with one other operand becomes neutral;
        - add/mul operands are the leaves of the operation's tree (``add(add(a, b), x)``
          is ``a + b + x``, through live same-op nodes that feed only it), so a parallel
          block's pruned branch is matched with the residual two adds away;
        - an operand is replaced through the nearest identity on a path that is exclusive to
          it, through already-neutral nodes too;
        - add only: a pruned branch whose value is a *shared* live norm of the residual
          (parallel blocks with one norm for attention and MLP) counts as that residual,
          so the branch goes as it does when the norm is the branch's own.
        """
        apply, g = self.apply, self.g
        ops = []
        changed = True
        while changed:
            changed = False
            for m in sorted(g.nodes, key=_natural):
                d = g.nodes[m]
                if d["kind"] not in (K.ARITH, K.CONCAT) or d["state"] != LIVE or d["op"] not in NEUTRAL_OF:
                    continue
                preds = list(d["operands"]) if d["op"] == "cat" else sorted(g.predecessors(m))
                if len(preds) < 2 or len(set(preds)) != len(preds) or set(preds) != set(g.predecessors(m)):
                    continue
                step = self._patch_cat(g, m, preds) if d["op"] == "cat" else self._patch_sum_or_product(g, m, preds)
                for op in step:
                    ops.append(apply(op))
                changed = changed or bool(step)
        return ops

    def _patch_cat(self, g: nx.DiGraph, m: str, preds: list[str]) -> list[dict]:
        """cat(x, x, ...) of one origin: all but one operand become Empty, consumers width-pruned."""
        traced = [follow_identity_operand(g, p) for p in preds]
        if len({_value_of(g, o, path, m) for o, path in traced}) != 1:
            return []
        replaceable = [bool(path) and self._replaceable_last(g, path[0], m) for _, path in traced]
        if sum(replaceable) < len(preds) - 1:
            return []
        keep = next((i for i, r in enumerate(replaceable) if not r),
                    min(range(len(preds)), key=lambda i: len(traced[i][1])))
        width = self._cat_width_op(g, m, [i for i in range(len(preds)) if i != keep])
        if width is None:
            return []
        ops = [self._replace_op(path[0], NEUTRAL_OF["cat"], dim=g.nodes[m]["cat"][0])
               for i, (_, path) in enumerate(traced) if i != keep]
        return ops + [width, {"op": "neutral", "node": m, "live_operand": preds[keep]}]

    def _patch_sum_or_product(self, g: nx.DiGraph, m: str, preds: list[str]) -> list[dict]:
        """The ops that patch the add/mul ``m``: neutral operands dropped, duplicated leaves of
        its tree replaced by the neutral element (see `_patch`)."""
        op = g.nodes[m]["op"]
        neutral_state = NEUTRAL_OF[op]
        # a zero stays zero through a scaling; nothing else keeps a neutral element neutral
        live = [p for p in preds
                if g.nodes[self._trace_branch(g, p, m, scalings=op == "add").origin]["state"] != neutral_state]
        if len(live) <= 1:
            return [{"op": "neutral", "node": m, "live_operand": (live or preds)[0]}]
        # leaves of the tree (operands, through live same-op nodes that feed only it)
        leaves, todo = [], [(p, m) for p in preds]
        while todo:
            p, parent = todo.pop()
            dp = g.nodes[p]
            if (dp["kind"] == K.ARITH and dp["op"] == op and dp["state"] == LIVE
                    and list(g.successors(p)) == [parent] and len(set(g.predecessors(p))) >= 2):
                todo.extend((q, p) for q in sorted(g.predecessors(p)))
                continue
            branch = self._trace_branch(g, p, parent, scalings=op == "add", norms=op == "add")
            if g.nodes[branch.origin]["state"] != neutral_state:
                leaves.append(branch)
        by_origin: dict[str, list] = {}
        for b in leaves:
            by_origin.setdefault(b.origin, []).append(b)
        ops = []
        for origin, group in sorted(by_origin.items(), key=lambda kv: _natural(kv[0])):
            if _parts_differ(g, origin):
                continue
            pure = [b for b in group if not b.derived]
            # a pruned branch that carries a function of the residual (a shared norm of it, a
            # scaled copy) is matched with that residual and removed, as a pure copy would be
            derived = [b for b in group if b.derived and b.target is not None]
            if pure and len(derived) == len(group) - len(pure):
                ops += [self._replace_op(b.target, neutral_state) for b in derived]
            if len(pure) < 2 or sum(b.target is None for b in pure) > 1:
                continue  # nothing duplicated, or two copies that cannot be replaced
            keep = next((i for i, b in enumerate(pure) if b.target is None),
                        min(range(len(pure)), key=lambda i: len(pure[i].path)))
            ops += [self._replace_op(b.target, neutral_state) for i, b in enumerate(pure) if i != keep]
        return ops

    def _trace_branch(self, g: nx.DiGraph, operand: str, parent: str, scalings: bool = False,
                      norms: bool = False) -> "_Branch":
        """Follow ``operand`` of the M node ``parent`` back to its origin, through transparent
        nodes and through what keeps a pruned branch a function of one value: live
        ``scalings`` (a mul/div by a constant, one traced input; zero stays zero) and live
        ``norms`` shared with another live unit. ``target``: the identity nearest to
        ``parent`` whose value reaches it through this path only, downstream of any norm
        walked (replacing it by the neutral element empties the branch)."""
        path, n, nxt, target, derived = [], operand, parent, None, False
        exclusive = True
        while True:
            d = g.nodes[n]
            exclusive = exclusive and list(g.successors(n)) == [nxt]
            if is_transparent(g, n):
                if target is None and exclusive and d["state"] == IDENTITY and d["module"]:
                    target = n
                nxt, n = n, (d["live_operand"] if d["state"] == NEUTRAL else next(iter(g.predecessors(n))))
                path.append(nxt)
                continue
            if (scalings and self._scaling(g, n)) or (norms and self._shared_norm(g, n)):
                derived = True
                nxt, n = n, next(iter(g.predecessors(n)))
                path.append(nxt)
                continue
            return _Branch(n, path, derived, target)

    @staticmethod
    def _scaling(g: nx.DiGraph, n: str) -> bool:
        """A live mul/div of one traced tensor by a constant or a parameter: maps zero to zero."""
        d = g.nodes[n]
        return d["kind"] == K.OTHER and d["state"] == LIVE and d["op"] in ("mul", "div", "truediv") \
            and g.in_degree(n) == 1

    @staticmethod
    def _shared_norm(g: nx.DiGraph, n: str) -> bool:
        """A live per-channel norm with one input that another live unit also reads."""
        d = g.nodes[n]
        if d["kind"] != K.NORM or d["state"] != LIVE or g.in_degree(n) != 1:
            return False
        return any(g.nodes[x]["kind"] in UNIT_KINDS and g.nodes[x]["state"] == LIVE
                   for x in forward_bounded_search(g, n))

    def _cat_width_op(self, g: nx.DiGraph, m: str, emptied: list[int]) -> dict | None:
        """The width op that removes the emptied operands' sections from every consumer of the
        concatenation ``m`` (all its operands are one value, so the sections are equal); None
        when the consumers are not all reachable through activations, identities and
        per-channel norms to live transforms that read the concatenated dimension as their channels."""
        dim, ndim = g.nodes[m]["cat"]

        def passes(g, n) -> bool:  # keeps the concatenated width: searched through
            d = g.nodes[n]
            return d["kind"] == K.ACTIVATION or (d["kind"] in (K.NORM, K.TRANSFORM) and d["state"] == IDENTITY) \
                or (d["kind"] == K.NORM and d["state"] == LIVE and bool(d["module"]))

        items, widths = [], set()
        for n in sorted(forward_bounded_search(g, m, bound=lambda g, n: not passes(g, n))):
            d = g.nodes[n]
            if passes(g, n) and d["state"] == IDENTITY or d["kind"] == K.ACTIVATION:
                continue
            module = self.model.get_submodule(d["module"]) if d["module"] else None
            if d["kind"] == K.NORM and d["state"] == LIVE and module is not None:
                w = getattr(module, "weight", None)
                channel_dim = 1 if isinstance(module, nn.modules.batchnorm._BatchNorm) else ndim - 1
                if w is None or w.dim() != 1 or dim != channel_dim:
                    return None
                items.append((d["module"], "out"))
                widths.add(w.shape[0])
            elif d["kind"] == K.TRANSFORM and d["state"] == LIVE and isinstance(module, nn.Linear) and dim == ndim - 1:
                items.append((d["module"], "in"))
                widths.add(module.in_features)
            elif d["kind"] == K.TRANSFORM and d["state"] == LIVE and isinstance(module, nn.modules.conv._ConvNd) \
                    and module.groups == 1 and dim == 1:
                items.append((d["module"], "in"))
                widths.add(module.in_channels)
            else:
                return None
        n_ops = len(g.nodes[m]["operands"])
        if not items or len(widths) != 1 or next(iter(widths)) % n_ops:
            return None
        size = next(iter(widths)) // n_ops
        idxs = sorted(j for i in emptied for j in range(i * size, (i + 1) * size))
        return {"op": "width", "unit": m, "items": [[path, dr, idxs] for path, dr in sorted(items)],
                "maps_indices": True}

    @staticmethod
    def _replaceable_last(g: nx.DiGraph, node: str, m: str) -> bool:
        d = g.nodes[node]
        return d["state"] == IDENTITY and bool(d["module"]) and list(g.successors(node)) == [m]

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
                _tp.prune_module(module, direction, idxs, self._norm_classes, K.transform_layout(module))
        elif kind == "refit":
            pass  # compensation changed weights only; replaying structure has nothing to do
        else:
            if kind == "replace":
                if log is not None:
                    log.append(("module", op["module"], self.model.get_submodule(op["module"])))
                self.model.set_submodule(op["module"], make_stand_in(op["with"]))
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

    # ------------------------------------------------------------------ checkpoints and trials
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


@dataclass
class _Branch:
    """An operand of an add/mul tree traced to its origin (see `DepthPruner._trace_branch`)."""

    origin: str
    path: list
    derived: bool  # its value is a function of the origin (scaled, normalised), not the origin
    target: str | None  # the identity to replace to empty the branch


def _parts_differ(g: nx.DiGraph, origin: str) -> bool:
    """A live op that cuts a tensor into parts (chunk, split): operands that trace back to it
    are different parts, not one value, so they are never patched as duplicates."""
    d = g.nodes[origin]
    return d["state"] == LIVE and bool(d.get("split"))


def _apply_to_graph(g: nx.DiGraph, op: dict) -> dict:
    """The graph side of a plan operation."""
    if op["op"] == "replace":
        g.nodes[op["node"]]["state"] = op["with"]["state"]
    elif op["op"] == "neutral":
        g.nodes[op["node"]].update(state=NEUTRAL, live_operand=op["live_operand"])
    return op


def _value_of(g: nx.DiGraph, origin: str, path: list, consumer: str):
    """What an operand of ``consumer`` computes, traced back to ``origin`` through ``path``: the
    origin, and which of its outputs when it has several (the pieces of a split are different
    values of one node)."""
    first = path[-1] if path else consumer
    return origin, g.edges[origin, first].get("ports")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _choose_classes(classes: list, scores: list, k: int, takes: dict, width: dict) -> list | None:
    """Root indices of the classes to remove: sizes summing to exactly ``k``, lowest total score,
    and no layer emptied. ``classes`` come best-to-remove first. Every layer that the classes
    could empty keeps its most important class; the rest is an exact-sum 0/1 knapsack (plain
    lowest-``k`` when every class is one channel). None when no selection exists."""
    hits = []
    for c in classes:
        h: dict = {}
        for r in c:
            for key in takes.get(r, ()):
                h[key] = h.get(key, 0) + 1
        hits.append(h)
    total: dict = {}
    for h in hits:
        for key, v in h.items():
            total[key] = total.get(key, 0) + v
    reserved = {max(i for i, h in enumerate(hits) if key in h)
                for key, t in total.items() if t >= (width[key] or 0)}
    free = [i for i in range(len(classes)) if i not in reserved]
    if all(len(classes[i]) == 1 for i in free):
        picked = free[:k] if len(free) >= k else None
    else:
        best = torch.full((k + 1,), float("inf"), dtype=torch.float64)
        best[0] = 0.0
        take = torch.zeros((len(free), k + 1), dtype=torch.bool)
        for j, i in enumerate(free):
            s = len(classes[i])
            if s > k:
                continue
            cand = torch.full_like(best, float("inf"))
            cand[s:] = best[:k + 1 - s] + scores[i]
            take[j] = cand < best
            best = torch.minimum(best, cand)
        picked, t = None, k
        if best[k] < float("inf"):
            picked = []
            for j in reversed(range(len(free))):
                if take[j, t]:
                    picked.append(free[j])
                    t -= len(classes[free[j]])
    return None if picked is None else [r for i in sorted(picked) for r in classes[i]]


def _module_state(module: nn.Module) -> dict:
    """What channel pruning changes on a module: plain attributes (widths), and the parameter
    and buffer objects with their data (BatchNorm's running statistics are buffers)."""
    plain = {k: v for k, v in module.__dict__.items() if isinstance(v, (int, float, tuple, list, str, bool))}
    params = {k: (p, p.data if p is not None else None) for k, p in module._parameters.items()}
    buffers = {k: (b, b.data if b is not None else None) for k, b in module._buffers.items()}
    return {"plain": plain, "_parameters": params, "_buffers": buffers}


def _restore_state(module: nn.Module, state: dict) -> None:
    module.__dict__.update(state["plain"])
    for where in ("_parameters", "_buffers"):
        store = getattr(module, where)
        store.clear()
        for k, (t, data) in state[where].items():
            if t is not None:
                t.data = data
            store[k] = t


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
