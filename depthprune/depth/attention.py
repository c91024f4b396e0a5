"""Attention collapse (thesis Algorithm 7): an attention unit is replaced by an identity on
its hidden-state argument, together with its post-norm (sandwich norms), the activations only
it feeds (FindAct, searched before the replacement since searches start at the unit) and the
norms only it reads (FindNorm). Identity patching then removes the residual branch.

The other attention-specific pieces live where their step does: the stand-in's signature (the
hidden argument and output structure of the attention call) in `replace.py`, and the check that
an attention output is shaped like its input in `DepthPruner.why_not`.
"""
from __future__ import annotations

from typing import Callable

import networkx as nx

from .. import layers as K
from ..graph.search import IDENTITY, LIVE

#: ops that map a zero tensor to a zero tensor (moves, reshapes, zero padding, scaling by a
#: parameter): an attention whose output reaches an addition only through them is a residual branch
ZERO_PRESERVING = {"view", "reshape", "transpose", "permute", "contiguous", "roll", "pad", "getitem", "flatten",
                   "unflatten", "narrow", "squeeze", "unsqueeze", "clone", "dropout", "to", "type_as", "mul",
                   "float", "half", "bfloat16", "div", "neg"}


class AttentionCollapser:
    """Attention collapse for `DepthPruner`. Uses the host's ``apply``, ``_replace_op``,
    ``_unit_norms``, ``_find_act``, ``_find_norm`` and ``_patch``."""

    g: nx.DiGraph
    apply: Callable[[dict], dict]

    def _collapse_attention(self, unit: str) -> list[dict]:
        """Replace the attention ``unit`` and what goes with it; returns the applied ops
        (identity patching comes after, in `DepthPruner._prune_ops`)."""
        ops: list[dict] = []
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
        return ops

    def _residual_fallback(self, unit: str) -> list[dict]:
        """After identity patching: an attention still an identity whose output reaches a live
        addition only through zero-preserving ops is a residual branch the patching could not
        match with its residual (its input reached it through window shifts and partitions): it
        becomes a Zero, so the branch adds nothing, and the patching runs again. Returns the ops
        (none when it was patched)."""
        if self.g.nodes[unit]["state"] != IDENTITY:
            return []
        n = unit
        while True:
            succ = list(self.g.successors(n))
            if len(succ) != 1:
                return []
            n = succ[0]
            d = self.g.nodes[n]
            if d["kind"] == K.ARITH and d["op"] == "add" and d["state"] == LIVE:
                break
            if not (d["state"] == IDENTITY or (d["kind"] == K.OTHER and d["state"] == LIVE
                                               and d["op"] in ZERO_PRESERVING and self.g.in_degree(n) == 1)):
                return []
        return [self.apply(self._replace_op(unit, "zero"))] + self._patch()

    def _shares_outputs(self, unit: str) -> bool:
        """The attention hands a value to another attention, or reads one from it (T5's position
        bias: computed by the first layer's attention, passed on by every later one): a stand-in
        returns only the hidden states and would drop it."""
        return any(self.g.nodes[n]["kind"] == K.ATTENTION
                   for n in (*self.g.successors(unit), *self.g.predecessors(unit)))
