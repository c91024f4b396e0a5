"""Identity patching (thesis Eqs. 3.5-3.7, generalised): after a unit is replaced, every
add/mul/cat whose operands became copies of one value, or the operation's neutral element, is
patched to a fixed point: duplicated branches are replaced by Zero/One/Empty stand-ins and the
operation becomes neutral (passes its one live operand through). An emptied concatenation
operand also width-prunes the concatenation's consumers (`Patcher._cat_width_op`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import networkx as nx
import torch.nn as nn

from ..graph import follow_identity_operand, forward_bounded_search, natural_key
from .. import layers as K
from ..graph.search import IDENTITY, LIVE, NEUTRAL, is_transparent

#: the stand-in state that is the neutral element of each patched operation
NEUTRAL_OF = {"add": "zero", "mul": "one", "cat": "empty"}


class Patcher:
    """Identity patching for `DepthPruner`. Reads ``self.g`` and ``self.model``; applies its
    ops through the host's ``apply`` and builds replacements with ``_replace_op``."""

    g: nx.DiGraph
    model: nn.Module
    apply: Callable[[dict], dict]

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
          (parallel blocks with one norm for attention and MLP), a live activation of it, or a
          gate of two such branches (``act(x) * x`` once a gated MLP's projections are all
          identities and its activation is a function call no stand-in replaces) counts as that
          residual, so the branch goes as it does when the norm is the branch's own.
        """
        apply, g = self.apply, self.g
        ops = []
        changed = True
        while changed:
            changed = False
            for m in sorted(g.nodes, key=natural_key):
                d = g.nodes[m]
                if d["kind"] not in (K.ARITH, K.CONCAT) or d["state"] != LIVE or d["op"] not in NEUTRAL_OF:
                    continue
                # a concatenation whose operand order DepGraph did not give is never emptied
                preds = list(d.get("operands") or ()) if d["op"] == "cat" else sorted(g.predecessors(m))
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
        for origin, group in sorted(by_origin.items(), key=lambda kv: natural_key(kv[0])):
            if _parts_differ(g, origin):
                continue
            pure = [b for b in group if not b.derived]
            # a pruned branch that carries a function of the residual (a shared norm of it, a
            # scaled copy) is matched with that residual and removed, as a pure copy would be
            derived = [b for b in group if b.derived and b.target is not None]
            if pure and len(derived) == len(group) - len(pure):
                ops += [self._replace_op(b.target, neutral_state) for b in derived]
            if not pure:
                ops += self._through_head(group, neutral_state)
            if len(pure) < 2 or sum(b.target is None for b in pure) > 1:
                continue  # nothing duplicated, or two copies that cannot be replaced
            keep = next((i for i, b in enumerate(pure) if b.target is None),
                        min(range(len(pure)), key=lambda i: len(pure[i].path)))
            ops += [self._replace_op(b.target, neutral_state) for i, b in enumerate(pure) if i != keep]
        return ops

    def _through_head(self, group: list["_Branch"], neutral_state: str) -> list[dict]:
        """Branches of one origin that are all derived: when one is the output of the node where
        its walk left the transparent ones (its ``head``: a norm shared with the next sublayer,
        as after a post-norm sublayer) and every other reaches that node upstream of its target
        (a function of that output: ``x + act(x)`` once the sublayer's transforms are pruned),
        the others are emptied, as for a pure copy."""
        for a in group:
            others = [b for b in group if b is not a]
            if a.head is not None and others and all(
                    b.target is not None and a.head in b.path and b.target in b.path
                    and b.path.index(b.target) < b.path.index(a.head) for b in others):
                return [self._replace_op(b.target, neutral_state) for b in others]
        return []

    def _trace_branch(self, g: nx.DiGraph, operand: str, parent: str, scalings: bool = False,
                      norms: bool = False) -> "_Branch":
        """Follow ``operand`` of the M node ``parent`` back to its origin, through transparent
        nodes and through what keeps a pruned branch a function of one value: live
        ``scalings`` (a mul/div by a constant, one traced input; zero stays zero) and live
        ``norms`` shared with another live unit. ``target``: the identity nearest to
        ``parent`` whose value reaches it through this path only, downstream of any norm
        walked (replacing it by the neutral element empties the branch)."""
        path, n, nxt, target, derived, head = [], operand, parent, None, False, None
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
            if (scalings and self._scaling(g, n)) or (norms and (self._shared_norm(g, n) or self._activation(g, n))):
                head = n if not derived else head
                derived = True
                nxt, n = n, next(iter(g.predecessors(n)))
                path.append(nxt)
                continue
            if norms and self._product(g, n):
                # a gate of two pruned branches of one value (act(x) * x, once both projections are
                # identities and the activation is a function call no stand-in can replace)
                inner = [self._trace_branch(g, p, n, scalings, norms) for p in sorted(g.predecessors(n))]
                if len({b.origin for b in inner}) == 1 and not _parts_differ(g, inner[0].origin):
                    return _Branch(inner[0].origin, path + [n], True, target, head if derived else n)
            return _Branch(n, path, derived, target, head)

    @staticmethod
    def _scaling(g: nx.DiGraph, n: str) -> bool:
        """A live mul/div of one traced tensor by a constant or a parameter: maps zero to zero."""
        d = g.nodes[n]
        return d["kind"] == K.OTHER and d["state"] == LIVE and d["op"] in ("mul", "div", "truediv") \
            and g.in_degree(n) == 1

    @staticmethod
    def _activation(g: nx.DiGraph, n: str) -> bool:
        """A live activation with one input: a weightless function of it."""
        d = g.nodes[n]
        return d["kind"] == K.ACTIVATION and d["state"] == LIVE and g.in_degree(n) == 1

    @staticmethod
    def _product(g: nx.DiGraph, n: str) -> bool:
        d = g.nodes[n]
        return d["kind"] == K.ARITH and d["op"] == "mul" and d["state"] == LIVE and g.in_degree(n) >= 2

    @staticmethod
    def _shared_norm(g: nx.DiGraph, n: str) -> bool:
        """A live per-channel norm with one input that another live unit also reads."""
        d = g.nodes[n]
        if d["kind"] != K.NORM or d["state"] != LIVE or g.in_degree(n) != 1:
            return False
        return any(g.nodes[x]["kind"] in K.UNIT_KINDS and g.nodes[x]["state"] == LIVE
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


@dataclass
class _Branch:
    """An operand of an add/mul tree traced to its origin (see `Patcher._trace_branch`)."""

    origin: str
    path: list
    derived: bool  # its value is a function of the origin (scaled, normalised), not the origin
    target: str | None  # the identity to replace to empty the branch
    head: str | None = None  # the first node walked through that is not transparent (its value is this one)


def _parts_differ(g: nx.DiGraph, origin: str) -> bool:
    """A live op that cuts a tensor into parts (chunk, split): operands that trace back to it
    are different parts, not one value, so they are never patched as duplicates."""
    d = g.nodes[origin]
    return d["state"] == LIVE and bool(d.get("split"))


def _value_of(g: nx.DiGraph, origin: str, path: list, consumer: str):
    """What an operand of ``consumer`` computes, traced back to ``origin`` through ``path``: the
    origin, and which of its outputs when it has several (the pieces of a split are different
    values of one node)."""
    first = path[-1] if path else consumer
    return origin, g.edges[origin, first].get("ports")
