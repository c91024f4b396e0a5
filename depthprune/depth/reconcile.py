"""Width reconciliation (docs/algorithms.md, step 1): before a non-square transform becomes an
identity, its own pruning group is width-pruned until ``out == parts * in``, removing the
lowest-scoring channel classes of the dependent layers; and the channel helpers that say which
parameter slices a width change removes.
"""
from __future__ import annotations

from typing import Any, Callable

import networkx as nx
import torch
import torch.nn as nn

from .. import layers as K
from ..channels import ChannelGroup
from ..graph.build import trace_dependency_graph

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
    """Default index score: sum of squared weights of each channel's slice (in float64, a few
    channels at a time: a float64 copy of a whole 4096 x 11008 weight would be 360 MB)."""
    total = torch.zeros(len(idxs), dtype=torch.float64)
    for s in channel_slices(module, direction, idxs):
        s = s.reshape(len(idxs), -1)
        step = max(1, (1 << 21) // max(1, s.shape[1]))  # about 16 MB of float64 per chunk
        for a in range(0, len(idxs), step):
            total[a:a + step] += s[a:a + step].double().pow(2).sum(1)
    return total


class Reconciler:
    """Width reconciliation for `DepthPruner`. Reads ``self.g``, ``self.model``, the example
    inputs, ``self.index_score`` and the structure version; uses ``widths``, ``_parts`` and
    ``_block`` of the host."""

    g: nx.DiGraph
    model: nn.Module
    example_inputs: Any
    forward_fn: Callable | None
    index_score: IndexScore
    _version: int
    _dgs: dict

    def _needs_width(self, unit: str) -> bool:
        """True when Prune(unit) must first reconcile widths (the unit is not square)."""
        i, o = self.widths(unit)
        return o != self._parts(unit) * i

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
        """Width-prune the unit's own pruning group until it is square (docs/algorithms.md, step 1).

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
        group = ChannelGroup(dg, module, direction, n)
        narrowed = sorted({type(m).__name__ for m, _, _, _ in group.layer_tables()
                           if K.is_embedding_module(m)})
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
            width[key] = dg.width(m, dr)
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
