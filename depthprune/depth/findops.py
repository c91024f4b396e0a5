"""FindAct and FindNorm (thesis Algorithms 1 and 2, corrected): the activations and norms that
go with a pruned unit, and the post-norm that is part of a unit (docs/algorithms.md, step 3).

Pure searches over the computation graph; they change nothing.
"""
from __future__ import annotations

import networkx as nx

from ..graph import backward_bounded_search, forward_bounded_search
from .. import layers as K
from ..graph.search import LIVE



class ActNormFinder:
    """FindAct/FindNorm for `DepthPruner`. Reads ``self._post_norm_in_unit`` (recipe ``post_norm``)."""

    _post_norm_in_unit: bool

    def _unit_norms(self, g: nx.DiGraph, unit: str) -> list[str]:
        """The norms that go with ``unit``: its post-norm, unless the recipe keeps post-norms."""
        return self._trailing_norms(g, unit) if self._post_norm_in_unit else []

    @staticmethod
    def _trailing_norms(g: nx.DiGraph, unit: str) -> list[str]:
        """Post-norm layers (Conv -> BN -> act): a norm that is the unit's only consumer and has
        no other producer is part of the unit (docs/algorithms.md, step 3)."""
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
                       if g.nodes[n]["kind"] in K.UNIT_KINDS and g.nodes[n]["state"] == LIVE}
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
                       if g.nodes[x]["kind"] in K.UNIT_KINDS and g.nodes[x]["state"] == LIVE}
            if reached <= T:
                found.append(n)
        return found
