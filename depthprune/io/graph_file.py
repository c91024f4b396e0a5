"""``graph.json`` of a live pruning session: the computation graph with every node's state,
widths and pruning order, as `depthprune.viz` draws it (the format is described in
`depthprune.viz.graphdata`)."""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch.nn as nn

from ..blocks import find_blocks
from .. import layers as K
from ..graph import module_path

GRAPH_FILE = "graph.json"
GRAPH_FORMAT = 1
LIVE = "live"


def graph_json(source: Any, blocks: list[str] | None = None) -> dict:
    """The ``graph.json`` object of a live `DepthPruner` (states, widths, pruning order) or of a
    `CompGraph` (every node live).

    ``blocks`` (module paths) defaults to `depthprune.blocks.find_blocks` on the model.
    """
    steps = list(getattr(source, "steps", None) or [])
    graph = getattr(source, "graph", source)  # a DepthPruner holds its CompGraph in .graph
    g: nx.DiGraph = source.g
    model: nn.Module = source.model
    order: dict[str, int] = {}
    pruned_by: dict[str, str] = {}
    cut: dict[str, list[tuple[str, int]]] = {}  # module path -> [(direction, channels removed)]
    for i, step in enumerate(steps, 1):
        unit = step.unit if hasattr(step, "unit") else step["unit"]
        for op in (step.ops if hasattr(step, "ops") else step["ops"]):
            if op["op"] in ("replace", "neutral"):
                order.setdefault(op["node"], i)
                pruned_by.setdefault(op["node"], unit)
            elif op["op"] == "width":
                for path, direction, idxs in op["items"]:
                    cut.setdefault(path, []).append((direction, len(idxs)))
    nodes = []
    for n in sorted(g.nodes):
        d = {k: v for k, v in sorted(g.nodes[n].items()) if isinstance(v, (str, int, float, bool))}
        module = _submodule(model, d.get("module", ""))
        d["params_after"] = (sum(p.numel() for p in module.parameters()) if module is not None else 0) \
            if d.get("module") else (d.get("params", 0) if d.get("state") == LIVE else 0)
        if n in order:
            d["order"], d["pruned_by"] = order[n], pruned_by[n]
        if d.get("module") in cut and module is not None and d.get("state") == LIVE:
            after = _widths(module)
            if after is not None:
                before = list(after)
                per_channel = _per_channel(module)
                for direction, k in cut[d["module"]]:
                    if per_channel:
                        before[0] += k
                        before[1] += k
                    else:
                        before[0 if direction == "in" else 1] += k
                d["widths_before"], d["widths_after"] = before, list(after)
        nodes.append({"id": n, **d})
    if blocks is None:
        blocks = [p for p, _ in find_blocks(model)]
    summary = graph.summary() if hasattr(graph, "summary") else {}
    return {"format": GRAPH_FORMAT, "summary": summary, "blocks": list(blocks), "nodes": nodes,
            "edges": [list(e) for e in sorted(g.edges)]}


def _submodule(model, path: str):
    if not path:
        return None
    try:
        return model.get_submodule(module_path(path))
    except AttributeError:
        return None


def _widths(module) -> list[int] | None:
    """``[in, out]`` channels of a module whose width pruning can change."""
    if K.is_transform_module(module):  # Linear, convolutions, registered layouts (GPT-2's Conv1D)
        return list(K.transform_widths(module))
    if isinstance(module, nn.Embedding):
        return [module.num_embeddings, module.embedding_dim]
    w = getattr(module, "weight", None)
    if w is not None and getattr(w, "dim", lambda: 0)() == 1:
        return [w.shape[0], w.shape[0]]
    return None


def _per_channel(module) -> bool:
    """Pruning one channel removes it from input and output alike (norms, depthwise conv)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == module.out_channels > 1
    return not (K.is_transform_module(module) or isinstance(module, nn.Embedding))
