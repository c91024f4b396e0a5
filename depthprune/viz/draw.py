"""Drawings of a (pruned) computation graph: Graphviz ``dot`` when installed, else our own
layered layout; GraphML/JSON for other tools.

A drawing shows one block (``block=N``), a range of blocks (``blocks=(A, B)``, half-open like a
Python slice) or the whole model, where each repeated block is collapsed to one box coloured by
the share of its parameters that is gone (``expand=True`` draws every node instead; models whose
repeated blocks hold under half of the units, e.g. CNNs, are drawn node by node).

Node colour = class (transform, activation, norm, arithmetic, concat, attention, ...); outline
and fill = state (live: solid, pale fill; identity: dashed, white; Zero/One/Empty operand:
dotted, yellow; neutral M node: dashed, grey). Width-pruned nodes carry ``in→out ⇒ in→out``.
In SVG output every node is a ``<g class="node kind-K state-S">`` whose ``<title>`` is the
node id, so tools (and the tests) can read the states back.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from ..errors import UserError
from . import style as S
from .graphdata import UNIT_KINDS, block_index, is_narrowed, main_blocks, params_after, relative_id
from .layout import layered_layout, to_png, to_svg

FORMATS = (".svg", ".png", ".graphml", ".json", ".dot")
DOT_TIMEOUT_S = 300


# ---------------------------------------------------------------------------- selection
def parse_range(text: str, n_blocks: int) -> tuple[int, int]:
    """``"A:B"`` (half-open, either end may be omitted, negatives count from the end) ->
    ``(a, b)`` with ``0 <= a < b <= n_blocks``; `UserError` otherwise."""
    if ":" not in text:
        raise UserError(f"--blocks needs A:B (e.g. 2:5), got {text!r}")
    lo, hi = text.split(":", 1)
    try:
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else n_blocks
    except ValueError:
        raise UserError(f"--blocks needs integers A:B, got {text!r}") from None
    a, b = (a + n_blocks if a < 0 else a), (b + n_blocks if b < 0 else b)
    if not 0 <= a < b <= n_blocks:
        raise UserError(f"--blocks {text} is empty or outside the model's {n_blocks} blocks (0..{n_blocks - 1})")
    return a, b


def select(g: nx.DiGraph, block: int | None = None, blocks: tuple[int, int] | None = None,
           expand: bool = False) -> nx.DiGraph:
    """The graph to draw, each node with display attributes (``label`` lines, ``kind``,
    ``state``, ``fill``, ``colour``, ``line``, ``shape``, ``penwidth``).

    The repeated blocks are ``g.graph["blocks"]``. Nodes next to the selection but outside it
    appear as small ``external`` nodes so the edges in and out stay visible.
    """
    paths = list(g.graph.get("blocks") or [])
    if block is not None and blocks is not None:
        raise UserError("give one of --block and --blocks")
    if block is not None or blocks is not None:
        if not paths:
            raise UserError("this model has no repeated blocks; draw the whole graph instead")
        if block is not None:
            if not -len(paths) <= block < len(paths):
                raise UserError(f"--block {block} is outside the model's {len(paths)} blocks (0..{len(paths) - 1})")
            a = block % len(paths)
            blocks = (a, a + 1)
        a, b = blocks
        keep = [n for n in g.nodes if (i := block_index(n, paths)) is not None and a <= i < b]
        return _subview(g, keep, paths[a] if b - a == 1 else None)
    main = main_blocks(g)
    if not main or expand:
        return _subview(g, list(g.nodes), None)
    return _collapsed(g, main)


def _subview(g: nx.DiGraph, keep: list, block_path: str | None) -> nx.DiGraph:
    view = nx.DiGraph()
    kept = set(keep)
    pos = {n: i for i, n in enumerate(g.nodes)}
    for n in sorted(kept, key=pos.__getitem__):
        view.add_node(n, **_node_display(n, g.nodes[n], relative_id(n, block_path) if block_path else n))
    for u, v in g.edges:
        if u in kept and v in kept:
            view.add_edge(u, v)
        elif u in kept or v in kept:
            ext = v if u in kept else u
            if ext not in view:
                view.add_node(ext, **_external_display(ext, g.nodes[ext]))
            view.add_edge(u, v)
    return view


def _collapsed(g: nx.DiGraph, paths: list[str]) -> nx.DiGraph:
    view = nx.DiGraph()
    owner = {n: block_index(n, paths) for n in g.nodes}
    members: dict[int, list] = {}
    for n, i in owner.items():
        if i is not None:
            members.setdefault(i, []).append(n)
    rep = {}
    for n in g.nodes:  # graph order, so blocks appear where their first node is
        i = owner[n]
        if i is None:
            view.add_node(n, **_node_display(n, g.nodes[n], n))
            rep[n] = n
        else:
            rep[n] = paths[i]
            if paths[i] not in view:
                view.add_node(paths[i], **_block_display(paths[i], [g.nodes[m] for m in members[i]]))
    for u, v in g.edges:
        a, b = rep[u], rep[v]
        if a != b:
            view.add_edge(a, b)
    return view


def _node_display(n: str, d: dict, name: str) -> dict:
    kind, state = d.get("kind", "other"), d.get("state", "live")
    label = [name]
    op = d.get("op", "")
    if op and op not in name:
        label.append(op)
    if is_narrowed(d):
        (i0, o0), (i1, o1) = d["widths_before"], d["widths_after"]
        label.append(f"{i0}→{o0} ⇒ {i1}→{o1}")
    if state != "live":
        tag = S.STATE_TAGS.get(state, state)
        label.append(f"{tag} · step {d['order']}" if d.get("order") else tag)
    pruned = state != "live"
    return dict(label=label, kind=kind, state=state, shape="ellipse" if kind in ("arith", "concat") else "box",
                fill=S.STATE_FILLS.get(state, "#ffffff") if pruned else S.KIND_FILLS.get(kind, "#ffffff"),
                colour=S.KIND_COLOURS.get(kind, "#7f7f7f"), line=S.STATE_LINES.get(state, "solid"),
                penwidth=2.0 if kind in ("attention", "experts") else 1.2, font="#555555" if pruned else "#111111",
                order=d.get("order") or 0, params=int(d.get("params", 0)), params_after=params_after(d),
                widths_before=_pair(d.get("widths_before")), widths_after=_pair(d.get("widths_after")),
                node_kind=kind)


def _external_display(n: str, d: dict) -> dict:
    return dict(label=[n], kind="external", state=d.get("state", "live"), shape="box", fill=S.KIND_FILLS["external"],
                colour=S.KIND_COLOURS["external"], line="solid", penwidth=0.8, font="#666666", order=0,
                params=int(d.get("params", 0)), params_after=params_after(d), widths_before="", widths_after="",
                node_kind=d.get("kind", "other"))


def _block_display(path: str, nodes: list[dict]) -> dict:
    before = sum(int(d.get("params", 0)) for d in nodes)
    after = sum(params_after(d) for d in nodes)
    share = (before - after) / before if before else 0.0
    pruned = sum(d.get("state", "live") != "live" for d in nodes)
    units = [d for d in nodes if d.get("kind") in UNIT_KINDS]
    units_gone = sum(d.get("state", "live") != "live" for d in units)
    state = "live" if pruned == 0 and before == after else ("removed" if after == 0 else "partial")
    fill = S.gone_colour(share)
    label = [path, f"{round(100 * share)} % of {_count(before)} params gone · {units_gone}/{len(units)} units"]
    return dict(label=label, kind="block", state=state, shape="box", fill=fill, colour="#444444", line="solid",
                penwidth=1.2, font=S.text_on(fill), order=0, params=before, params_after=after,
                share_gone=round(share, 6), nodes=len(nodes), nodes_pruned=pruned, widths_before="",
                widths_after="", node_kind="block")


def _pair(v) -> str:
    return f"{v[0]},{v[1]}" if v else ""


def _count(n: int) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


# ---------------------------------------------------------------------------- legend
@dataclass(frozen=True)
class LegendEntry:
    text: str
    fill: str
    colour: str
    line: str


def legend(view: nx.DiGraph) -> list[LegendEntry]:
    """Legend entries for the kinds and states present in ``view``."""
    ds = [d for _, d in view.nodes(data=True)]
    kinds = [k for k in S.KIND_COLOURS if any(d["kind"] == k for d in ds) and k not in ("block", "external")]
    out = [LegendEntry(S.KIND_LABELS.get(k, k), S.KIND_FILLS[k], S.KIND_COLOURS[k], "solid") for k in kinds]
    states = {d["state"] for d in ds if d["kind"] not in ("block", "external")}
    for s in S.STATES[1:]:
        if s in states:
            out.append(LegendEntry(S.STATE_TAGS[s], S.STATE_FILLS[s], "#555555", S.STATE_LINES[s]))
    if any(d["kind"] == "block" for d in ds):
        out.append(LegendEntry("block: 0 % gone", S.gone_colour(0), "#444444", "solid"))
        out.append(LegendEntry("block: 100 % gone", S.gone_colour(1), "#444444", "solid"))
    if any(d["kind"] == "external" for d in ds):
        out.append(LegendEntry("outside the selection", S.KIND_FILLS["external"], S.KIND_COLOURS["external"], "solid"))
    return out


# ---------------------------------------------------------------------------- DOT
def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def to_dot(view: nx.DiGraph, title: str = "") -> str:
    """Graphviz DOT text of a view from `select` (top to bottom, legend as one node)."""
    lines = ["digraph depthprune {",
             f"  graph [rankdir=TB, nodesep=0.25, ranksep=0.32, fontname={_q(S.FONT)}, fontsize=13, "
             f"labelloc=t, label={_q(title)}, bgcolor=white];",
             f"  node [fontname={_q(S.FONT)}, fontsize=11, margin=\"0.10,0.04\", height=0.3];",
             "  edge [color=\"#555555\", arrowsize=0.6, penwidth=0.9];"]
    for n, d in view.nodes(data=True):
        style = "rounded,filled" if d["shape"] == "box" else "filled"
        if d["line"] != "solid":
            style += "," + d["line"]
        attrs = {"label": "\n".join(d["label"]), "shape": d["shape"], "style": style, "fillcolor": d["fill"],
                 "color": d["colour"], "fontcolor": d["font"], "penwidth": str(d["penwidth"]),
                 "class": f"kind-{d['kind']} state-{d['state']}"}
        lines.append(f"  {_q(n)} [" + ", ".join(f"{k}={_q(v)}" for k, v in attrs.items()) + "];")
    for u, v in view.edges:
        lines.append(f"  {_q(u)} -> {_q(v)};")
    entries = legend(view)
    if entries:
        rows = "".join(
            f'<TR><TD BGCOLOR="{e.fill}" COLOR="{e.colour}"'
            + (f' STYLE="{e.line}"' if e.line != "solid" else "")
            + f' ALIGN="LEFT"><FONT POINT-SIZE="10" COLOR="{S.text_on(e.fill)}">{_html(e.text)}</FONT></TD></TR>'
            for e in entries)
        lines.append('  "__legend__" [shape=plaintext, class="legend", label=<<TABLE BORDER="0" CELLBORDER="1" '
                     f'CELLSPACING="2" CELLPADDING="4"><TR><TD BORDER="0"><B>legend</B></TD></TR>{rows}</TABLE>>];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_binary() -> str | None:
    """Path of Graphviz ``dot``, or None when it is not installed."""
    return shutil.which("dot")


# ---------------------------------------------------------------------------- output
def export_graph(view: nx.DiGraph) -> nx.DiGraph:
    """The view with scalar attributes only (GraphML): ``label`` is one line per ``\\n``."""
    h = nx.DiGraph()
    for n, d in view.nodes(data=True):
        h.add_node(n, **{k: ("\n".join(v) if k == "label" else v) for k, v in d.items()
                         if k == "label" or isinstance(v, (str, int, float, bool))})
    h.add_edges_from(view.edges)
    return h


def render(view: nx.DiGraph, out: str | os.PathLike, title: str = "", engine: str = "auto") -> str:
    """Write ``view`` to ``out`` by extension (.svg, .png, .graphml, .json, .dot).

    ``engine``: ``auto`` (``dot`` when installed, else the built-in layout), ``dot`` or
    ``builtin``. Returns what drew it: ``dot``, ``builtin`` or ``data`` (GraphML/JSON/DOT).
    The file is written to a temporary sibling and moved into place when complete.
    """
    out = Path(out)
    ext = out.suffix.lower()
    if ext not in FORMATS:
        raise UserError(f"unknown drawing format {out.suffix!r}; use one of {', '.join(FORMATS)}")
    if engine not in ("auto", "dot", "builtin"):
        raise UserError(f"unknown drawing engine {engine!r}")
    dot = dot_binary() if engine != "builtin" else None
    if engine == "dot" and dot is None:
        raise UserError("Graphviz `dot` is not installed (Debian/Ubuntu: apt-get install graphviz)")
    if not out.parent.is_dir():
        raise UserError(f"directory {out.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=ext)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        used = "data"
        if ext == ".graphml":
            nx.write_graphml(export_graph(view), tmp)
        elif ext == ".json":
            h = export_graph(view)
            tmp.write_text(json.dumps({"nodes": [{"id": n, **d} for n, d in h.nodes(data=True)],
                                       "edges": [list(e) for e in h.edges]}, indent=1))
        elif ext == ".dot":
            tmp.write_text(to_dot(view, title))
        elif dot is not None:
            r = subprocess.run([dot, f"-T{ext[1:]}", "-o", str(tmp)], input=to_dot(view, title), text=True,
                               capture_output=True, timeout=DOT_TIMEOUT_S)
            if r.returncode != 0:
                why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
                raise UserError(f"Graphviz dot failed: {why}")
            used = "dot"
        else:
            lay = layered_layout(view)
            if ext == ".svg":
                tmp.write_text(to_svg(view, lay, legend(view), title))
            else:
                to_png(view, lay, legend(view), tmp, title)
            used = "builtin"
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return used


def draw(g: nx.DiGraph, out: str | os.PathLike, block: int | None = None, blocks: tuple[int, int] | None = None,
         expand: bool = False, title: str = "", engine: str = "auto") -> str:
    """`select` then `render`; returns the engine used (see `render`)."""
    return render(select(g, block, blocks, expand), out, title, engine)


BUILTIN_NOTE = ("Graphviz `dot` is not installed: drawn with depthprune's own layered layout "
                "(install it for better layouts: apt-get install graphviz)")


def builtin_note() -> str:
    """What to say under a drawing made by the built-in layout."""
    return BUILTIN_NOTE if dot_binary() is None else "drawn with depthprune's own layered layout (--engine builtin)"
