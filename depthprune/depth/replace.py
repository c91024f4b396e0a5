"""Identity replacement: the plan operation that swaps a module for a stand-in
(`depth/identity.py`: Identity, Zero, One, Empty) and what it does to the graph, and fused
transforms (one weight cut by ``chunk``/``split`` into ``k`` parts, whose identity repeats
its input ``k`` times).

An attention unit's stand-in keeps the attention call's signature: it returns the hidden
argument shaped as the attention's output structure (see `attention.py`).
"""
from __future__ import annotations

import networkx as nx
import torch.nn as nn

from ..graph import CompGraph
from .. import layers as K
from ..graph.search import LIVE, NEUTRAL
from .identity import plain_attributes


class Replacer:
    """Replacement ops for `DepthPruner`. Reads ``self.g``, ``self.graph`` and ``self.model``."""

    g: nx.DiGraph
    graph: CompGraph
    model: nn.Module

    def _replace_op(self, node: str, state: str, **extra) -> dict:
        d = self.g.nodes[node]
        call = self.graph.calls.get(node)
        hidden = list(call.hidden_arg) if call is not None and call.hidden_arg else ["arg", 0]
        structure = call.out_structure if call is not None and call.out_structure else "tensor"
        if d["kind"] not in K.COLLAPSED:
            hidden, structure = ["arg", 0], "tensor"
        spec = {"state": state, "hidden_arg": hidden,
                "out_structure": list(structure) if isinstance(structure, tuple) else structure, **extra}
        attrs = plain_attributes(self.model.get_submodule(d["module"]))
        if attrs:
            spec["attrs"] = attrs
        return {"op": "replace", "node": node, "module": d["module"], "with": spec}

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
        """How many fused transforms ``unit`` is (1 when its output is not cut into parts)."""
        fused = self.fused_split(unit)
        return fused[1] if fused else 1


def _apply_to_graph(g: nx.DiGraph, op: dict) -> dict:
    """The graph side of a plan operation."""
    if op["op"] == "replace":
        g.nodes[op["node"]]["state"] = op["with"]["state"]
    elif op["op"] == "neutral":
        g.nodes[op["node"]].update(state=NEUTRAL, live_operand=op["live_operand"])
    return op
