"""depthprune's own layered layout, used when Graphviz ``dot`` is not installed.

Sugiyama-style, kept small: break cycles, put every node on the layer of its longest path from
a source (topological layers), route edges that skip layers through dummy points, order each
layer by barycentre sweeps, then pull nodes toward their neighbours without overlap. Output as
SVG (same ``<g class="node kind-K state-S"><title>id</title>`` structure as Graphviz's) or PNG
through matplotlib. Units are pixels at a 11 px font.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from html import escape

import networkx as nx

from . import style as S

CHAR_W = 6.7  # average advance of an 11 px sans-serif character
LINE_H = 14.0
PAD_X, PAD_Y = 10.0, 6.0
H_GAP, V_GAP = 18.0, 34.0
MARGIN = 16.0
FONT_FAMILY = "DejaVu Sans, Helvetica, Arial, sans-serif"
DASH = {"solid": None, "dashed": "6,3", "dotted": "1.5,2.5"}


@dataclass
class Box:
    x: float  # centre
    y: float
    w: float
    h: float


@dataclass
class Layout:
    boxes: dict = field(default_factory=dict)  # node -> Box
    edges: list = field(default_factory=list)  # (u, v, [(x, y), ...])
    width: float = 0.0
    height: float = 0.0


def node_size(lines: list[str]) -> tuple[float, float]:
    return max(len(s) for s in lines) * CHAR_W + 2 * PAD_X, len(lines) * LINE_H + 2 * PAD_Y


def _acyclic(g: nx.DiGraph) -> nx.DiGraph:
    """``g`` with the back edges of a depth-first search reversed (a DAG)."""
    if nx.is_directed_acyclic_graph(g):
        return g
    h = g.copy()
    for u, v, kind in nx.dfs_labeled_edges(g):
        if kind == "nontree" and u != v and h.has_edge(u, v) and nx.has_path(h, v, u):
            h.remove_edge(u, v)
            h.add_edge(v, u)
    h.remove_edges_from(nx.selfloop_edges(h))
    return h


def layered_layout(view: nx.DiGraph, sweeps: int = 8) -> Layout:
    """Positions for every node of ``view`` (``label`` attribute: list of lines)."""
    dag = _acyclic(view)
    topo = list(nx.topological_sort(dag))
    rank = {n: i for i, n in enumerate(topo)}
    layer: dict = {}
    for n in topo:
        layer[n] = max((layer[p] + 1 for p in dag.predecessors(n)), default=0)
    size = {n: node_size(view.nodes[n]["label"]) for n in view.nodes}
    # dummy points for edges that skip layers
    chains: dict = {}
    adj_down: dict = {n: [] for n in view.nodes}
    adj_up: dict = {n: [] for n in view.nodes}
    for u, v in dag.edges:
        prev, chain = u, []
        for k in range(layer[u] + 1, layer[v]):
            d = ("__dummy__", u, v, k)
            layer[d] = k
            size[d] = (4.0, LINE_H)
            rank[d] = rank[u] + 0.5
            adj_down[d], adj_up[d] = [], []
            chain.append(d)
            adj_down[prev].append(d)
            adj_up[d].append(prev)
            prev = d
        adj_down[prev].append(v)
        adj_up[v].append(prev)
        chains[(u, v)] = chain
    n_layers = max(layer.values(), default=-1) + 1
    layers: list[list] = [[] for _ in range(n_layers)]
    for n in sorted(layer, key=lambda n: rank[n]):
        layers[layer[n]].append(n)
    pos = {n: i for lay in layers for i, n in enumerate(lay)}
    for s in range(sweeps):
        down = s % 2 == 0
        seq = range(1, n_layers) if down else range(n_layers - 2, -1, -1)
        for li in seq:
            nbrs = adj_up if down else adj_down
            lay = layers[li]
            bary = {n: (sum(pos[m] for m in nbrs[n]) / len(nbrs[n]) if nbrs[n] else pos[n]) for n in lay}
            lay.sort(key=lambda n: (bary[n], pos[n]))
            for i, n in enumerate(lay):
                pos[n] = i
    # x coordinates: packed, then pulled toward neighbours keeping order and gaps
    x: dict = {}
    for lay in layers:
        cur = 0.0
        for n in lay:
            w = size[n][0]
            x[n] = cur + w / 2
            cur += w + H_GAP
    for it in range(12):
        down = it % 2 == 0
        seq = range(n_layers) if down else range(n_layers - 1, -1, -1)
        for li in seq:
            lay = layers[li]
            want = []
            for n in lay:
                nb = (adj_up[n] if down else adj_down[n]) or adj_up[n] + adj_down[n]
                want.append(sum(x[m] for m in nb) / len(nb) if nb else x[n])
            placed = list(want)
            for i in range(1, len(lay)):
                need = (size[lay[i - 1]][0] + size[lay[i]][0]) / 2 + H_GAP
                placed[i] = max(placed[i], placed[i - 1] + need)
            shift = sum(w - p for w, p in zip(want, placed)) / len(lay) if lay else 0.0
            for n, p in zip(lay, placed):
                x[n] = p + shift
    left = min((x[n] - size[n][0] / 2 for n in x), default=0.0)
    out = Layout()
    y = MARGIN
    for lay in layers:
        h = max(size[n][1] for n in lay)
        for n in lay:
            out.boxes[n] = Box(x[n] - left + MARGIN, y + h / 2, *size[n])
        y += h + V_GAP
    out.height = y - V_GAP + MARGIN
    out.width = max((b.x + b.w / 2 for b in out.boxes.values()), default=0.0) + MARGIN
    for u, v in view.edges:
        if (u, v) in chains:
            a, b, chain = u, v, chains[(u, v)]
        else:  # an edge reversed to break a cycle: drawn back up
            a, b, chain = v, u, chains.get((v, u), [])
        pts = [(out.boxes[a].x, out.boxes[a].y + out.boxes[a].h / 2)]
        pts += [(out.boxes[d].x, out.boxes[d].y) for d in chain]
        pts.append((out.boxes[b].x, out.boxes[b].y - out.boxes[b].h / 2))
        if (u, v) not in chains:
            pts.reverse()
        out.edges.append((u, v, pts))
    for d in [k for k in out.boxes if isinstance(k, tuple) and k and k[0] == "__dummy__"]:
        del out.boxes[d]
    return out


def _legend_size(entries) -> tuple[float, float]:
    if not entries:
        return 0.0, 0.0
    w = max(len(e.text) for e in entries) * CHAR_W + 2 * PAD_X + 8
    return max(w, 80.0), 22.0 + len(entries) * (LINE_H + 8)


def to_svg(view: nx.DiGraph, lay: Layout, entries=(), title: str = "") -> str:
    """SVG text of a laid-out view, legend to the right of the graph."""
    lw, lh = _legend_size(entries)
    top = 24.0 if title else 0.0
    width = lay.width + (lw + 2 * MARGIN if entries else 0)
    height = max(lay.height, lh + 2 * MARGIN) + top
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
         f'viewBox="0 0 {width:.1f} {height:.1f}" font-family="{FONT_FAMILY}" font-size="11">',
         '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
         'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555555"/></marker></defs>',
         f'<rect x="0" y="0" width="{width:.1f}" height="{height:.1f}" fill="#ffffff"/>',
         f'<g class="graph" transform="translate(0 {top:.1f})"><title>{escape(title)}</title>']
    if title:
        o.append(f'<text x="{width / 2:.1f}" y="-8" text-anchor="middle" font-size="13">{escape(title)}</text>')
    for u, v, pts in lay.edges:
        p = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        o.append(f'<g class="edge"><title>{escape(str(u))}-&gt;{escape(str(v))}</title>'
                 f'<polyline points="{p}" fill="none" stroke="#555555" stroke-width="0.9" '
                 f'marker-end="url(#arrow)"/></g>')
    for n, b in lay.boxes.items():
        d = view.nodes[n]
        dash = DASH.get(d["line"])
        stroke = f'fill="{d["fill"]}" stroke="{d["colour"]}" stroke-width="{d["penwidth"]}"' + (
            f' stroke-dasharray="{dash}"' if dash else "")
        o.append(f'<g class="node kind-{escape(d["kind"])} state-{escape(d["state"])}"><title>{escape(str(n))}</title>')
        if d["shape"] == "ellipse":
            o.append(f'<ellipse cx="{b.x:.1f}" cy="{b.y:.1f}" rx="{b.w / 2 + 4:.1f}" ry="{b.h / 2:.1f}" {stroke}/>')
        else:
            o.append(f'<rect x="{b.x - b.w / 2:.1f}" y="{b.y - b.h / 2:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" '
                     f'rx="5" {stroke}/>')
        lines = d["label"]
        y0 = b.y - (len(lines) - 1) * LINE_H / 2 + 4
        o.append(f'<text text-anchor="middle" fill="{d["font"]}">' + "".join(
            f'<tspan x="{b.x:.1f}" y="{y0 + i * LINE_H:.1f}">{escape(s)}</tspan>' for i, s in enumerate(lines))
            + "</text></g>")
    if entries:
        lx, ly = lay.width + MARGIN, MARGIN
        o.append(f'<g class="legend"><rect x="{lx - 6:.1f}" y="{ly - 6:.1f}" width="{lw + 12:.1f}" '
                 f'height="{lh + 6:.1f}" fill="#ffffff" stroke="#cccccc"/>'
                 f'<text x="{lx:.1f}" y="{ly + 10:.1f}" font-weight="bold">legend</text>')
        for i, e in enumerate(entries):
            y = ly + 20 + i * (LINE_H + 8)
            dash = DASH.get(e.line)
            o.append(f'<rect x="{lx:.1f}" y="{y:.1f}" width="{lw:.1f}" height="{LINE_H + 4:.1f}" rx="3" '
                     f'fill="{e.fill}" stroke="{e.colour}"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>"
                     f'<text x="{lx + PAD_X:.1f}" y="{y + LINE_H - 1:.1f}" '
                     f'fill="{S.text_on(e.fill)}">{escape(e.text)}</text>')
        o.append("</g>")
    o.append("</g></svg>")
    return "\n".join(o) + "\n"


MAX_PNG_PIXELS = 12000


def to_png(view: nx.DiGraph, lay: Layout, entries, path: str | os.PathLike, title: str = "") -> None:
    """Render a laid-out view with matplotlib (the PNG fallback without Graphviz)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse, FancyBboxPatch

    lw, lh = _legend_size(entries)
    top = 24.0 if title else 0.0
    width = lay.width + (lw + 2 * MARGIN if entries else 0)
    height = max(lay.height, lh + 2 * MARGIN) + top
    dpi = min(144.0, MAX_PNG_PIXELS * 72.0 / max(width, height))
    fig = plt.figure(figsize=(width / 72.0, height / 72.0), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    styles = {"solid": "-", "dashed": (0, (6, 3)), "dotted": (0, (1, 2))}
    if title:
        ax.text(width / 2, 16, title, ha="center", va="center", fontsize=13)
    for _, _, pts in lay.edges:
        xs, ys = zip(*[(a, b + top) for a, b in pts])
        ax.plot(xs, ys, color="#555555", lw=0.9, zorder=1)
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]),
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=0.9, shrinkA=0, shrinkB=0), zorder=1)
    for n, b in lay.boxes.items():
        d = view.nodes[n]
        kw = dict(facecolor=d["fill"], edgecolor=d["colour"], lw=d["penwidth"], linestyle=styles[d["line"]], zorder=2)
        if d["shape"] == "ellipse":
            ax.add_patch(Ellipse((b.x, b.y + top), b.w + 8, b.h, **kw))
        else:
            ax.add_patch(FancyBboxPatch((b.x - b.w / 2, b.y + top - b.h / 2), b.w, b.h,
                                        boxstyle="round,pad=0,rounding_size=5", **kw))
        ax.text(b.x, b.y + top, "\n".join(d["label"]), ha="center", va="center", fontsize=11,
                color=d["font"], linespacing=1.15, zorder=3, family="sans-serif")
    if entries:
        lx, ly = lay.width + MARGIN, MARGIN + top
        ax.text(lx, ly + 6, "legend", fontsize=11, weight="bold", va="center")
        for i, e in enumerate(entries):
            y = ly + 20 + i * (LINE_H + 8)
            ax.add_patch(FancyBboxPatch((lx, y), lw, LINE_H + 4, boxstyle="round,pad=0,rounding_size=3",
                                        facecolor=e.fill, edgecolor=e.colour, linestyle=styles[e.line]))
            ax.text(lx + PAD_X, y + (LINE_H + 4) / 2, e.text, fontsize=11, va="center", color=S.text_on(e.fill))
    fig.savefig(path, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
