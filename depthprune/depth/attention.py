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


class AttentionCollapser:
    """Attention collapse for `DepthPruner`. Uses the host's ``apply``, ``_replace_op``,
    ``_unit_norms``, ``_find_act`` and ``_find_norm``."""

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
