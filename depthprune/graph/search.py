"""Graph queries of the paper: bounded searches (Alg. 3, 4) and FollowIdOperand (Alg. 6).

They work on any `networkx.DiGraph` whose nodes carry ``kind`` and ``state`` attributes, so
they are tested on small hand-built graphs.

Boundary choice (docs/architecture.md, "Bounded searches"): a bounded search stops at every transform or
attention node *whatever its state*, so an identity that replaced a transform still bounds
the search. FindAct/FindNorm then ignore identity nodes when they compare the reached
transforms with the trigger set.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable

import networkx as nx

from ..layers import UNIT_KINDS

Node = Hashable

#: States a node can be in. ``live`` computes as traced; ``identity`` returns its input;
#: ``zero``/``one``/``empty`` return the neutral operand of the M node they feed;
#: ``neutral`` marks an M node whose result equals its one live operand.
LIVE, IDENTITY, ZERO, ONE, EMPTY, NEUTRAL = "live", "identity", "zero", "one", "empty", "neutral"


def is_boundary(g: nx.DiGraph, n: Node) -> bool:
    return g.nodes[n]["kind"] in UNIT_KINDS


def _bounded(g: nx.DiGraph, start: Node | Iterable[Node], step: Callable,
             bound: Callable[[nx.DiGraph, Node], bool]) -> set:
    starts = [start] if start in g else list(start)
    seen: set = set()
    todo = []
    for s in starts:
        todo.extend(step(s))
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if not bound(g, n):
            todo.extend(step(n))
    return seen


def forward_bounded_search(g: nx.DiGraph, start, bound=is_boundary) -> set:
    """Nodes reachable downstream of `start`, not expanding past boundary nodes (included)."""
    return _bounded(g, start, g.successors, bound)


def backward_bounded_search(g: nx.DiGraph, start, bound=is_boundary) -> set:
    """Nodes reachable upstream of `start`, not expanding past boundary nodes (included)."""
    return _bounded(g, start, g.predecessors, bound)


def is_transparent(g: nx.DiGraph, n: Node) -> bool:
    """An identity with one input, or a neutral M node: its output is an upstream value."""
    d = g.nodes[n]
    return (d["state"] == IDENTITY and g.in_degree(n) == 1) or d["state"] == NEUTRAL


def follow_identity_operand(g: nx.DiGraph, operand: Node) -> tuple[Node, list]:
    """Follow an operand back through transparent nodes to its origin.

    Returns ``(origin, path)``: `path` lists the transparent nodes walked, nearest first, so an
    operand that is itself a computing node has origin == operand and an empty path.
    """
    path = []
    n = operand
    while is_transparent(g, n):
        path.append(n)
        d = g.nodes[n]
        n = d["live_operand"] if d["state"] == NEUTRAL else next(iter(g.predecessors(n)))
    return n, path
