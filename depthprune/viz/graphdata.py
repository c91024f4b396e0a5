"""The data every picture is drawn from: the semantic graph as JSON (``graph.json``).

Format (``format`` 1): the object `depthprune.graph.CompGraph.to_json` writes, plus what
pruning adds. Every picture in `depthprune.viz` reads only this, a ``plan.json`` and a
``report.json``, so output directories and the command line need no live model.

``nodes``: one object per node with
    ``id``, ``kind`` (transform, activation, norm, arith, concat, attention, embedding, other,
    output), ``state`` (live, identity, zero, one, empty, neutral; after pruning), ``module``,
    ``op``, ``params`` (parameters the node held in the base model), ``in_shape``,
    ``out_shape``, ``is_output``; optional:
    ``params_after`` (parameters it holds now; default ``params`` when live, else 0),
    ``widths_before`` / ``widths_after`` (``[in, out]`` channels, only on width-pruned nodes),
    ``order`` (1-based index of the plan step that first took the node out of ``live``) and
    ``pruned_by`` (that step's unit).
``edges``: ``[source, target]`` pairs.
``blocks``: module paths of the repeated blocks in order (`depthprune.blocks.find_blocks`);
    when absent they are inferred from the node ids (`infer_blocks`).
``summary``: node counts by kind.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import networkx as nx

from ..errors import UserError
from ..integrity import read_json_file

from ..io.graph_file import GRAPH_FILE, GRAPH_FORMAT, LIVE, graph_json  # noqa: F401 (graph_json: public here)


# ---------------------------------------------------------------------------- reading
def load_graph(src: str | os.PathLike | dict) -> nx.DiGraph:
    """A ``graph.json`` (path, directory holding one, or the parsed object) as a DiGraph; the
    block paths are in ``g.graph["blocks"]``. Raises `UserError` on unreadable input."""
    if isinstance(src, dict):
        data = src
    else:
        p = Path(src)
        if p.is_dir():
            p = p / GRAPH_FILE
        if not p.exists() and not p.is_symlink():
            raise UserError(f"no such graph file: {p}")
        data = read_json_file(p, "graph")
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not isinstance(
            data.get("edges"), list):
        raise UserError("a graph JSON object needs 'nodes' and 'edges' lists")
    g = nx.DiGraph()
    for node in data["nodes"]:
        if not isinstance(node, dict) or "id" not in node:
            raise UserError("every graph node needs an 'id'")
        attrs = {k: v for k, v in node.items() if k != "id"}
        attrs.setdefault("kind", "other")
        attrs.setdefault("state", LIVE)
        attrs.setdefault("params", 0)
        g.add_node(node["id"], **attrs)
    for e in data["edges"]:
        if len(e) != 2 or e[0] not in g or e[1] not in g:
            raise UserError(f"graph edge {e!r} names an unknown node")
        g.add_edge(e[0], e[1])
    g.graph["blocks"] = list(data["blocks"]) if data.get("blocks") is not None else infer_blocks(g.nodes)
    g.graph["summary"] = data.get("summary") or {}
    return g


def graph_dict(g: nx.DiGraph) -> dict:
    """The ``graph.json`` object of a DiGraph read by `load_graph` (its inverse)."""
    return {"format": GRAPH_FORMAT, "summary": g.graph.get("summary") or {},
            "blocks": list(g.graph.get("blocks") or []),
            "nodes": [{"id": n, **d} for n, d in g.nodes(data=True)], "edges": [list(e) for e in g.edges]}


def params_after(d: dict) -> int:
    """Parameters a node holds now (``params_after``, else ``params`` while live, else 0)."""
    if "params_after" in d:
        return int(d["params_after"])
    return int(d.get("params", 0)) if d.get("state", LIVE) == LIVE else 0


def is_narrowed(d: dict) -> bool:
    return bool(d.get("widths_before")) and list(d["widths_before"]) != list(d.get("widths_after") or [])


# ---------------------------------------------------------------------------- blocks
_INDEX = re.compile(r"\.(\d+)(?=[./@]|$)")


def infer_blocks(node_ids: Iterable[str]) -> list[str]:
    """Repeated blocks guessed from node ids alone: the prefix ``P`` with children ``P.0`` ..
    ``P.(n-1)`` (n >= 2) that all hold the same relative node ids, covering the most nodes.
    The same rule as `depthprune.blocks.find_blocks` (same-class modules), read from data."""
    members: dict[str, dict[int, set[str]]] = {}
    for nid in node_ids:
        for m in _INDEX.finditer(nid):
            prefix, idx = nid[:m.start()], int(m.group(1))
            members.setdefault(prefix, {}).setdefault(idx, set()).add(nid[m.end():])
    best: tuple[int, str, int] | None = None
    for prefix, by_idx in members.items():
        n = len(by_idx)
        if n < 2 or sorted(by_idx) != list(range(n)):
            continue
        shapes = {frozenset(v) for v in by_idx.values()}
        if len(shapes) != 1:
            continue
        covered = sum(len(v) for v in by_idx.values())
        if best is None or covered > best[0] or (covered == best[0] and len(prefix) < len(best[1])):
            best = (covered, prefix, n)
    return [] if best is None else [f"{best[1]}.{i}" for i in range(best[2])]


UNIT_KINDS = ("transform", "attention", "experts")


def main_blocks(g: nx.DiGraph, share: float = 0.5) -> list[str]:
    """``g.graph["blocks"]`` when they hold at least ``share`` of the model's units (transform
    and attention nodes), else ``[]``: a Transformer's decoder layers qualify, a detection
    head's short list of same-class convs does not (the model is then drawn node by node and
    mapped as a strip)."""
    blocks = list(g.graph.get("blocks") or [])
    units = [n for n, k in g.nodes(data="kind") if k in UNIT_KINDS]
    inside = sum(block_index(n, blocks) is not None for n in units)
    return blocks if blocks and units and inside >= share * len(units) else []


def block_index(node_id: str, blocks: list[str]) -> int | None:
    """Index of the block holding ``node_id`` (module path or ``<call path>/<op>#k``), or None."""
    for i, b in enumerate(blocks):
        if node_id == b or node_id.startswith((b + ".", b + "/", b + "@")):
            return i
    return None


def relative_id(node_id: str, block: str) -> str:
    """``model.layers.3.mlp.up_proj`` in block ``model.layers.3`` -> ``mlp.up_proj``;
    ``model.layers.3/add#0`` -> ``add#0``."""
    if node_id == block:
        return "(block)"
    return node_id[len(block) + 1:] if node_id.startswith(block) else node_id


# ---------------------------------------------------------------------------- plans
def apply_plan(g: nx.DiGraph, plan: dict) -> nx.DiGraph:
    """A copy of ``g`` with the node states and pruning order that ``plan`` (a ``plan.json``
    object, or its ``steps`` list) records: data only, no model. Width changes are not
    reconstructed (they need the modules); ``graph_json`` of the live session has them."""
    steps = plan.get("steps", []) if isinstance(plan, dict) else plan
    h = g.copy()
    for i, step in enumerate(steps, 1):
        for op in step.get("ops", []):
            if op.get("op") == "replace":
                node, state = op["node"], op["with"]["state"]
            elif op.get("op") == "neutral":
                node, state = op["node"], "neutral"
            else:
                continue
            if node not in h:
                raise UserError(f"plan step {i} names node {node!r}, which is not in the graph")
            d = h.nodes[node]
            d["state"] = state
            d["params_after"] = 0
            d.setdefault("order", i)
            d.setdefault("pruned_by", step.get("unit", ""))
            if "live_operand" in op:
                d["live_operand"] = op["live_operand"]
    return h
