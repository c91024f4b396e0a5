"""The pruning map (the thesis's Figure 4.3): which layers are gone, in which state and order.

Models whose repeated blocks hold most units (`main_blocks`) get a grid: one column per
block, one row per *part* of a block.
Parts are the block-relative ids of its nodes (``self_attn``, ``mlp.gate_proj``,
``input_layernorm``, ``mlp.act_fn``, ...), found from the graph data, so no model family is
named here. Models without repeated blocks (CNNs) get a strip: every transform/attention unit
along the network in topological order.

The map is data first (`build_map` -> `PruningMap`, asserted by the tests), then a picture
(`plot_map`, matplotlib, PNG or SVG). A cell's label is the pruning order: the plan step (or,
given the report's groups, the schedule step) that took the node out of ``live``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from ..errors import UserError
from ..graph import natural_key
from ..io.outdir import write_output_file
from . import style as S
from .graphdata import block_index, is_narrowed, main_blocks, relative_id

#: Node kinds shown as map rows (grid) or cells (strip).
GRID_KINDS = ("attention", "experts", "transform", "norm", "activation")
STRIP_KINDS = ("attention", "experts", "transform")


@dataclass(frozen=True)
class Cell:
    node: str
    state: str  # live, identity, zero, one, empty, neutral
    order: int | None = None  # pruning order (1-based); None while live
    narrowed: bool = False  # live but width-pruned
    widths: str = ""  # "in→out ⇒ in→out" when narrowed

    @property
    def shown(self) -> str:
        """The colour key: the state, or ``narrowed`` for a live width-pruned node."""
        return "narrowed" if self.state == "live" and self.narrowed else self.state


@dataclass
class PruningMap:
    """``cells[r][c]``: grid rows are blocks and columns are parts; a strip has one row and a
    column per unit. ``None`` where a block has no such part."""
    layout: str  # "grid" or "strip"
    rows: list[str]
    cols: list[str]
    cells: list[list[Cell | None]]
    order_by: str = "step"  # "step" (plan step) or "group" (report group)
    counts: dict = field(default_factory=dict)

    def states(self) -> list[list[str | None]]:
        """``cells`` as their colour keys (state, or ``narrowed``)."""
        return [[c.shown if c else None for c in row] for row in self.cells]

    def orders(self) -> list[list[int | None]]:
        return [[c.order if c else None for c in row] for row in self.cells]

    def cell(self, row: str, col: str) -> Cell | None:
        return self.cells[self.rows.index(row)][self.cols.index(col)]

    def as_dict(self) -> dict:
        return {"layout": self.layout, "rows": self.rows, "cols": self.cols, "order_by": self.order_by,
                "cells": [[None if c is None else {"node": c.node, "state": c.shown, "order": c.order}
                           for c in row] for row in self.cells]}


def _topo(g: nx.DiGraph) -> list:
    try:
        return list(nx.lexicographical_topological_sort(g, key=natural_key))
    except nx.NetworkXUnfeasible:  # not a DAG: natural order of ids
        return sorted(g.nodes, key=natural_key)


def _group_orders(groups: list[dict] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, grp in enumerate(groups or [], 1):
        for u in grp.get("units") or [grp.get("unit")]:
            if u:
                out.setdefault(u, i)
    return out


def _cell(n: str, d: dict, by_group: dict[str, int]) -> Cell:
    order = d.get("order")
    if by_group:
        order = by_group.get(d.get("pruned_by", ""), order)
    widths = ""
    if is_narrowed(d):
        (i0, o0), (i1, o1) = d["widths_before"], d["widths_after"]
        widths = f"{i0}→{o0} ⇒ {i1}→{o1}"
    return Cell(n, d.get("state", "live"), int(order) if order and d.get("state", "live") != "live" else None,
                is_narrowed(d), widths)


def build_map(g: nx.DiGraph, groups: list[dict] | None = None, kinds: tuple[str, ...] | None = None,
              layout: str = "auto") -> PruningMap:
    """The map of graph data ``g`` (`load_graph`). ``groups``: the report's ``units`` list
    (``{"unit", "units": [...]}`` per schedule step); when every pruned node's step belongs to
    one, cells show the group's number instead of the plan step. ``layout``: ``auto`` (grid when
    the model has repeated blocks holding units), ``grid`` or ``strip``."""
    blocks = list(g.graph.get("blocks") or [])
    topo = _topo(g)
    pos = {n: i for i, n in enumerate(topo)}
    by_group = _group_orders(groups)
    pruned = [d for _, d in g.nodes(data=True) if d.get("state", "live") != "live" and d.get("pruned_by")]
    use_groups = bool(by_group) and bool(pruned) and all(d["pruned_by"] in by_group for d in pruned)
    if not use_groups:
        by_group = {}
    if layout not in ("auto", "grid", "strip"):
        raise UserError(f"unknown map layout {layout!r}; use grid or strip")
    if layout == "auto":
        layout = "grid" if main_blocks(g) else "strip"
    if layout == "grid":
        if not blocks:
            raise UserError("a grid map needs repeated blocks; this model has none (use the strip)")
        kinds = kinds or GRID_KINDS
        owner = {n: block_index(n, blocks) for n in topo}
        start: dict[int, int] = {}
        for n in topo:
            if owner[n] is not None:
                start.setdefault(owner[n], pos[n])
        parts: dict[str, int] = {}  # part -> position within its block (first block holding it)
        per_block: list[dict[str, str]] = [{} for _ in blocks]
        for n in topo:
            i = owner[n]
            if i is None or g.nodes[n].get("kind") not in kinds:
                continue
            rel = relative_id(n, blocks[i])
            per_block[i][rel] = n
            parts.setdefault(rel, pos[n] - start[i])
        cols = sorted(parts, key=lambda r: (parts[r], natural_key(r)))
        cells = [[_cell(per_block[i][c], g.nodes[per_block[i][c]], by_group) if c in per_block[i] else None
                  for c in cols] for i in range(len(blocks))]
        m = PruningMap("grid", list(blocks), cols, cells, "group" if use_groups else "step")
    else:
        kinds = kinds or STRIP_KINDS
        units = [n for n in topo if g.nodes[n].get("kind") in kinds]
        m = PruningMap("strip", ["units"], units, [[_cell(n, g.nodes[n], by_group) for n in units]],
                       "group" if use_groups else "step")
    counts: dict[str, int] = {}
    for row in m.cells:
        for c in row:
            if c is not None:
                counts[c.shown] = counts.get(c.shown, 0) + 1
    m.counts = counts
    return m


# ---------------------------------------------------------------------------- picture
def _short_block(path: str) -> str:
    tail = path.rsplit(".", 1)[-1]
    return tail if tail.isdigit() else path


def plot_map(m: PruningMap, out: str | os.PathLike, title: str = "") -> Path:
    """Draw ``m`` to ``out`` (.png or .svg). Grid: blocks along x, parts along y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    out = S.picture_path(out, "the pruning map is")
    cell_in = 0.34
    if m.layout == "grid":
        # picture rows = parts, picture columns = blocks
        grid = [[m.cells[b][p] for b in range(len(m.rows))] for p in range(len(m.cols))]
        ylabels, xlabels = m.cols, [_short_block(r) for r in m.rows]
        lines = [(grid, ylabels, xlabels)]
        label_w = max((len(s) for s in ylabels), default=4) * 0.09 + 0.3
        xlabel_h = 0.5
    else:
        per_line = 30
        units = m.cells[0]
        lines = []
        for k in range(0, len(units), per_line):
            chunk = units[k:k + per_line]
            lines.append(([chunk], [f"{k + 1}–{k + len(chunk)}"], [c.node for c in chunk]))
        label_w = 0.7
        xlabel_h = max((len(c.node) for c in units), default=4) * 0.062 + 0.2
    n_cols = max((len(x) for _, _, x in lines), default=1)
    heights = [len(gr) * cell_in + xlabel_h + 0.15 for gr, _, _ in lines]
    present = [k for k in S.MAP_COLOURS if k != "absent" and m.counts.get(k)]
    legend_h = 0.5
    fig_w = max(label_w + n_cols * cell_in + 0.4, 6.0)
    fig_h = sum(heights) + legend_h + (0.45 if title else 0.1)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=150)
    y_top = fig_h - (0.45 if title else 0.1)
    if title:
        fig.text(0.5, 1 - 0.25 / fig_h, title, ha="center", va="center", fontsize=12)
    bottom = y_top
    for (gr, ylabels, xlabels), h in zip(lines, heights):
        rows = len(gr)
        ax_h = rows * cell_in
        ax = fig.add_axes((label_w / fig_w, (y_top - ax_h) / fig_h, len(xlabels) * cell_in / fig_w, ax_h / fig_h))
        bottom = y_top - ax_h
        y_top -= h
        ax.set_xlim(0, len(xlabels))
        ax.set_ylim(rows, 0)
        for r, row in enumerate(gr):
            for c, cell in enumerate(row):
                key = cell.shown if cell is not None else "absent"
                fill = S.MAP_COLOURS[key]
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor=fill, edgecolor="#ffffff", lw=1.2))
                if cell is not None and cell.order is not None:
                    ax.text(c + 0.5, r + 0.52, str(cell.order), ha="center", va="center",
                            fontsize=8 if cell.order < 100 else 6, color=S.text_on(fill))
        ax.set_yticks([r + 0.5 for r in range(rows)])
        ax.set_yticklabels(ylabels, fontsize=10)
        ax.set_xticks([c + 0.5 for c in range(len(xlabels))])
        ax.set_xticklabels(xlabels, fontsize=9 if m.layout == "grid" else 8, rotation=0 if m.layout == "grid" else 90)
        ax.tick_params(length=0, pad=2)
        for sp in ax.spines.values():
            sp.set_visible(False)
        if m.layout == "grid":
            ax.set_xlabel("block", fontsize=10, labelpad=2)
    handles = [Patch(facecolor=S.MAP_COLOURS[k], edgecolor="#999999", label=S.MAP_LABELS[k]) for k in present]
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 7), fontsize=10, frameon=False,
                   bbox_to_anchor=(0.5, (bottom - xlabel_h) / fig_h), handlelength=1.2, columnspacing=1.2)
    try:
        write_output_file(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=150, facecolor="white",
                                                       bbox_inches="tight", pad_inches=0.12), force=True)
    finally:
        plt.close(fig)
    return out
