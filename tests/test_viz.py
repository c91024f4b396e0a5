"""depthprune.viz: pictures drawn from data, read back (states, cells, series), not just written."""
import argparse
import base64
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn as nn

from depthprune.cli import viz as cli_viz
from depthprune.adapters.hf import random_llama, renumber_attention_layers, wrap
from depthprune.depth import DepthPruner
from depthprune.depth.plan import fingerprint, plan_dict
from depthprune.io.model_dir import save_pruned
from depthprune.errors import UserError
from depthprune.viz import apply_plan, graph_json, infer_blocks, load_graph, render, select
from depthprune.viz.curves import curve_points, parse_specs, plot_curves
from depthprune.viz.draw import dot_binary
from depthprune.viz.graphdata import graph_dict, main_blocks
from depthprune.viz.pruning_map import build_map, plot_map
from depthprune.viz.report_html import write_report

SVG = "{http://www.w3.org/2000/svg}"

# A known plan on a 3-block random Llama: an MLP transform of block 1, the attention of block 0,
# then every unit of block 2.
PLAN_UNITS = ["model.layers.1.mlp.gate_proj", "model.layers.0.self_attn", "model.layers.2.self_attn",
              "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
PARTS = ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp.gate_proj", "mlp.act_fn",
         "mlp.up_proj", "mlp.down_proj"]
MAP_STATES = [
    ["identity", "zero", "live", "live", "live", "live", "live"],
    ["live", "live", "live", "identity", "identity", "narrowed", "narrowed"],
    ["identity", "zero", "identity", "identity", "one", "identity", "zero"],
]
MAP_ORDERS = [
    [2, 2, None, None, None, None, None],
    [None, None, None, 1, 1, None, None],
    [3, 3, 5, 4, 4, 5, 6],
]
# Block 1 after the plan, with the nodes just outside it.
BLOCK1_STATES = {
    "model.layers.1.input_layernorm": "live", "model.layers.1.self_attn": "live",
    "model.layers.1/add#0": "live", "model.layers.1.post_attention_layernorm": "live",
    "model.layers.1.mlp.gate_proj": "identity", "model.layers.1.mlp.act_fn": "identity",
    "model.layers.1.mlp.up_proj": "live", "model.layers.1.mlp/mul#0": "live",
    "model.layers.1.mlp.down_proj": "live", "model.layers.1/add#1": "live",
    # just outside the block: its input (block 0's last add) and the two consumers of its output
    "model.layers.0/add#1": "live", "model.layers.2.input_layernorm": "identity",
    "model.layers.2/add#0": "neutral",
}


def _pruned(layers: int, units: list[str]):
    lm = wrap(random_llama(layers), f"random-llama:{layers}")
    base_fp = fingerprint(lm.model)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe,
                     on_change=renumber_attention_layers)
    base = graph_json(dp)
    for u in units:
        dp.prune(u)
    return dp, base, base_fp


@pytest.fixture(scope="module")
def known():
    """(pruner after PLAN_UNITS, graph.json before, graph.json after, base fingerprint)."""
    torch.manual_seed(0)
    dp, base, fp = _pruned(3, PLAN_UNITS)
    return dp, base, graph_json(dp), fp


def svg_states(path) -> dict[str, str]:
    """``{node id: state}`` read back from an SVG written by Graphviz or the built-in layout."""
    out = {}
    for g in ET.parse(path).getroot().iter(f"{SVG}g"):
        classes = (g.get("class") or "").split()
        if "node" in classes and "legend" not in classes:  # dot draws the legend as one node
            title = g.find(f"{SVG}title").text
            states = [c[len("state-"):] for c in classes if c.startswith("state-")]
            out[title] = states[0]
    return out


def svg_texts(path) -> str:
    return " ".join(t for t in ET.parse(path).getroot().itertext())


ENGINES = ["builtin", pytest.param("dot", marks=pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz dot not installed (apt-get install graphviz)"))]


# ---------------------------------------------------------------------------- graph data
@pytest.mark.unit
def test_graph_json_states_order_and_widths(known):
    dp, base, data, _ = known
    assert data["blocks"] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(n["state"] == "live" and "order" not in n for n in base["nodes"])
    nodes = {n["id"]: n for n in data["nodes"]}
    pruned = {n: (d["state"], d["order"], d["pruned_by"]) for n, d in nodes.items() if d["state"] != "live"}
    assert pruned == {
        "model.layers.1.mlp.gate_proj": ("identity", 1, PLAN_UNITS[0]),
        "model.layers.1.mlp.act_fn": ("identity", 1, PLAN_UNITS[0]),
        "model.layers.0.self_attn": ("zero", 2, PLAN_UNITS[1]),
        "model.layers.0.input_layernorm": ("identity", 2, PLAN_UNITS[1]),
        "model.layers.0/add#0": ("neutral", 2, PLAN_UNITS[1]),
        "model.layers.2.self_attn": ("zero", 3, PLAN_UNITS[2]),
        "model.layers.2.input_layernorm": ("identity", 3, PLAN_UNITS[2]),
        "model.layers.2/add#0": ("neutral", 3, PLAN_UNITS[2]),
        "model.layers.2.mlp.gate_proj": ("identity", 4, PLAN_UNITS[3]),
        "model.layers.2.mlp.act_fn": ("one", 4, PLAN_UNITS[3]),
        "model.layers.2.mlp.up_proj": ("identity", 5, PLAN_UNITS[4]),
        "model.layers.2.post_attention_layernorm": ("identity", 5, PLAN_UNITS[4]),
        "model.layers.2.mlp/mul#0": ("neutral", 5, PLAN_UNITS[4]),
        "model.layers.2.mlp.down_proj": ("zero", 6, PLAN_UNITS[5]),
        "model.layers.2/add#1": ("neutral", 6, PLAN_UNITS[5]),
    }
    narrowed = {n: (d["widths_before"], d["widths_after"], d["params_after"]) for n, d in nodes.items()
                if "widths_before" in d}
    # gate_proj 64->128 went: width reconciliation cut 64 of up's outputs and down's inputs
    assert narrowed == {"model.layers.1.mlp.up_proj": ([64, 128], [64, 64], 64 * 64),
                        "model.layers.1.mlp.down_proj": ([128, 64], [64, 64], 64 * 64)}
    assert nodes["model.layers.1.mlp.up_proj"]["params"] == 64 * 128
    assert all(d["params_after"] == 0 for d in nodes.values() if d["state"] != "live")


@pytest.mark.unit
def test_graph_json_reads_widths_of_transposed_conv1d_layers():
    """GPT-2's projections are Hugging Face ``Conv1D`` (weight ``[in, out]``): a narrowed one shows
    its widths before and after, input first, and is not drawn as a per-channel layer."""
    from archs import DECODERS
    arch = DECODERS["gpt2"]()
    dp = DepthPruner(arch.model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe, on_change=arch.on_change)
    dp.prune("transformer.h.1.mlp.c_fc")  # 64 -> 256 goes: reconciliation cuts c_proj's inputs to 64
    nodes = {n["id"]: n for n in graph_json(dp)["nodes"]}
    narrowed = {n: (d["widths_before"], d["widths_after"]) for n, d in nodes.items() if "widths_before" in d}
    assert narrowed == {"transformer.h.1.mlp.c_proj": ([256, 64], [64, 64])}


@pytest.mark.unit
def test_apply_plan_reproduces_states_from_data(known):
    dp, base, data, fp = known
    plan = plan_dict(dp, "random-llama:3", fp)
    g = apply_plan(load_graph(base), plan)
    h = load_graph(data)
    for n in h.nodes:
        assert (g.nodes[n]["state"], g.nodes[n].get("order")) == (h.nodes[n]["state"], h.nodes[n].get("order")), n
    with pytest.raises(UserError, match="not in the graph"):
        apply_plan(load_graph(base), {"steps": [{"unit": "x", "ops": [
            {"op": "replace", "node": "nope", "module": "nope", "with": {"state": "identity"}}]}]})


@pytest.mark.unit
def test_infer_blocks_from_ids():
    ids = [f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn", "mlp.up_proj")]
    ids += [f"model.layers.{i}/add#0" for i in range(4)] + ["model.embed_tokens", "lm_head"]
    assert infer_blocks(ids) == [f"model.layers.{i}" for i in range(4)]
    # YOLO's top-level list holds different modules; the longest repeated structure is a C3's
    # three bottlenecks, too few units for a grid map or a collapsed drawing
    yolo = nx.read_graphml(Path(__file__).resolve().parents[1] / "graphs" / "yolov5n.graphml")
    assert infer_blocks(yolo.nodes) == ["model.6.m.0", "model.6.m.1", "model.6.m.2"]
    yolo.graph["blocks"] = infer_blocks(yolo.nodes)
    assert main_blocks(yolo) == []
    # a structure that differs in one block is not repeated
    assert infer_blocks(ids + ["model.layers.2.extra"]) == []


@pytest.mark.unit
def test_load_graph_rejects_bad_input(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        load_graph(tmp_path / "bad.json")
    with pytest.raises(UserError, match="no such graph"):
        load_graph(tmp_path / "missing.json")
    with pytest.raises(UserError, match="unknown node"):
        load_graph({"nodes": [{"id": "a"}], "edges": [["a", "b"]]})


# ---------------------------------------------------------------------------- drawings
@pytest.mark.unit
@pytest.mark.parametrize("engine", ENGINES)
def test_drawing_of_pruned_block_reads_back_exact_states(known, tmp_path, engine):
    _, _, data, _ = known
    g = load_graph(data)
    out = tmp_path / "block1.svg"
    assert render(select(g, block=1), out, engine=engine) == engine
    assert svg_states(out) == BLOCK1_STATES
    text = svg_texts(out)
    assert "64→128 ⇒ 64→64" in text and "128→64 ⇒ 64→64" in text  # up_proj, down_proj
    assert "identity · step 1" in text
    # GraphML of the same selection: the same states, as data
    gml = tmp_path / "block1.graphml"
    assert render(select(g, block=1), gml) == "data"
    h = nx.read_graphml(gml)
    assert {n: d["state"] for n, d in h.nodes(data=True)} == BLOCK1_STATES
    assert h.nodes["model.layers.1.mlp.up_proj"]["widths_before"] == "64,128"
    assert h.nodes["model.layers.1.mlp.up_proj"]["widths_after"] == "64,64"


@pytest.mark.unit
@pytest.mark.parametrize("engine", ENGINES)
def test_whole_model_collapses_blocks_by_share_gone(known, tmp_path, engine):
    _, _, data, _ = known
    g = load_graph(data)
    view = select(g)
    assert [n for n in view.nodes if view.nodes[n]["kind"] == "block"] == \
        ["model.layers.0", "model.layers.1", "model.layers.2"]
    block_params = 64 + 12288 + 64 + 3 * 64 * 128  # norm, attention (q, k, v, o), norm, gate/up/down
    share = {n: view.nodes[n]["share_gone"] for n in ("model.layers.0", "model.layers.1", "model.layers.2")}
    assert share == {"model.layers.0": round((64 + 12288) / block_params, 6),
                     "model.layers.1": round((64 * 128 + 2 * 64 * 64) / block_params, 6),
                     "model.layers.2": 1.0}
    assert [view.nodes[b]["state"] for b in share] == ["partial", "partial", "removed"]
    out = tmp_path / "whole.svg"
    render(view, out, engine=engine)
    states = svg_states(out)
    assert states["model.layers.2"] == "removed" and states["lm_head"] == "live"
    assert "100 % of 37k params gone · 4/4 units" in svg_texts(out)
    # a range (half-open) and the expanded whole model
    assert {n for n in select(g, blocks=(0, 2)).nodes if n.startswith("model.layers.2")} == \
        {"model.layers.2.input_layernorm", "model.layers.2/add#0"}  # only as neighbours
    assert select(g, expand=True).number_of_nodes() == g.number_of_nodes()
    with pytest.raises(UserError, match="outside"):
        select(g, block=3)


@pytest.mark.unit
def test_builtin_layout_when_dot_is_not_on_path(known, tmp_path, monkeypatch):
    _, _, data, fp = known
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert dot_binary() is None
    g = load_graph(data)
    out = tmp_path / "b1.svg"
    assert render(select(g, block=1), out) == "builtin"
    assert svg_states(out) == BLOCK1_STATES
    png = tmp_path / "b1.png"
    assert render(select(g, block=1), png) == "builtin"
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert w > 400 and h > 800  # 13 nodes on 9 layers, 11 px text at 2x
    with pytest.raises(UserError, match="not installed"):
        render(select(g, block=1), tmp_path / "x.svg", engine="dot")
    # the command says it drew without Graphviz
    d = tmp_path / "out"
    d.mkdir()
    (d / "graph.json").write_text(json.dumps(data))
    args = _parse(["viz", str(d), "--block", "1", "--out", str(tmp_path / "cli.svg")])
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert args.func(args) == 0
    assert "own layered layout" in err.getvalue()
    assert svg_states(tmp_path / "cli.svg") == BLOCK1_STATES


@pytest.mark.unit
def test_layout_never_overlaps_nodes(known):
    from depthprune.viz.layout import layered_layout
    g = load_graph(known[2])
    for view in (select(g, blocks=(0, 3)), select(g, expand=True)):
        lay = layered_layout(view)
        assert set(lay.boxes) == set(view.nodes)
        boxes = list(lay.boxes.values())
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                apart = abs(a.x - b.x) >= (a.w + b.w) / 2 or abs(a.y - b.y) >= (a.h + b.h) / 2
                assert apart
        for u, v, pts in lay.edges:  # edges go downward from their source to their target
            assert pts[0][1] < pts[-1][1]


# ---------------------------------------------------------------------------- pruning map
@pytest.mark.unit
def test_pruning_map_of_known_plan(known, tmp_path):
    dp, base, data, fp = known
    m = build_map(load_graph(data))
    assert m.layout == "grid"
    assert m.rows == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert m.cols == PARTS
    assert m.states() == MAP_STATES
    assert m.orders() == MAP_ORDERS
    assert m.cell("model.layers.1", "mlp.up_proj").widths == "64→128 ⇒ 64→64"
    assert m.counts == {"live": 8, "identity": 7, "zero": 3, "one": 1, "narrowed": 2}
    # the same map from the graph before pruning plus plan.json (data only)
    m2 = build_map(apply_plan(load_graph(base), plan_dict(dp, "random-llama:3", fp)))
    assert (m2.states(), m2.orders()) == ([[s if s != "narrowed" else "live" for s in r] for r in MAP_STATES],
                                          MAP_ORDERS)
    # report groups renumber the cells (a block-granularity schedule: one step per block)
    groups = [{"unit": "a", "units": PLAN_UNITS[:1]}, {"unit": "b", "units": PLAN_UNITS[1:2]},
              {"unit": "model.layers.2", "units": PLAN_UNITS[2:]}]
    m3 = build_map(load_graph(data), groups)
    assert m3.order_by == "group" and m3.orders()[2] == [3] * 7
    for ext in (".png", ".svg"):
        out = plot_map(m, tmp_path / f"map{ext}", title="map")
        assert out.stat().st_size > 5000
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "map.svg").read_text()
    assert ET.fromstring(svg).tag == f"{SVG}svg"


class NarrowNet(nn.Module):
    """stem 3->8, c1 8->16 (+BN, ReLU), c2 16->8, head 8->4: c1 changes the width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.c2(self.act(self.bn(self.c1(self.stem(x))))))


@pytest.mark.unit
def test_cnn_strip_map_and_drawing(tmp_path):
    torch.manual_seed(0)
    dp = DepthPruner(NarrowNet().eval(), (torch.randn(1, 3, 8, 8),))
    dp.prune("c1")
    data = graph_json(dp)
    assert data["blocks"] == []
    g = load_graph(data)
    m = build_map(g)
    assert (m.layout, m.cols) == ("strip", ["stem", "c1", "c2", "head"])
    assert m.states() == [["live", "identity", "narrowed", "live"]]
    assert m.orders() == [[None, 1, None, None]]
    assert m.cell("units", "c2").widths == "16→8 ⇒ 8→8"
    plot_map(m, tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size > 3000
    view = select(g)  # no blocks: every node
    assert view.number_of_nodes() == g.number_of_nodes()
    render(view, tmp_path / "cnn.svg", engine="builtin")
    states = svg_states(tmp_path / "cnn.svg")
    assert {n: s for n, s in states.items() if s != "live"} == {"c1": "identity", "bn": "identity",
                                                               "act": "identity"}


# ---------------------------------------------------------------------------- curves
def _report(reduction, ppl=None, ms=None, **extra):
    ev = {}
    if ppl is not None:
        ev["perplexity"] = {"value": ppl, "command": "depthprune eval X"}
    if ms is not None:
        ev["latency_ms"] = ms
    return {"reduction": reduction, "eval": ev, **extra}


@pytest.mark.unit
def test_curves_one_series_per_label(tmp_path):
    reports = {"f10": _report(0.1, 20.0, 9.0, granularity="fine"),
               "f20": _report(0.2, 30.0, 8.0, granularity="fine"),
               "b20": _report(0.2, 60.0, 7.5, granularity="block"),
               "s20": _report(0.2, 40.0, None, granularity="sublayer",
                              params_before=100, params_after=80)}
    reports["s20"].pop("reduction")  # read from params_before/after
    reports["b20"]["eval"]["dense"] = {"perplexity": 10.0, "latency_ms": 10.0}
    for name, r in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(r))
    specs = parse_specs(f"{tmp_path / 'f20'},{tmp_path / 'f10'},{tmp_path / 'b20'},"
                        f"renamed={tmp_path / 's20' / 'report.json'}")
    series = curve_points(specs)
    got = {k: [(round(p.reduction, 6), p.quality.get("perplexity"), p.latency_ms) for p in v]
           for k, v in series.items()}
    assert got == {"fine": [(0.1, 20.0, 9.0), (0.2, 30.0, 8.0)],
                   "block": [(0.0, 10.0, 10.0), (0.2, 60.0, 7.5)],
                   "renamed": [(0.2, 40.0, None)]}
    info = plot_curves(series, tmp_path / "c.png")
    assert info["quality"] == "perplexity" and info["panels"] == ["perplexity", "latency"]
    assert info["series"]["fine"] == [[10.0, 20.0, 9.0], [20.0, 30.0, 8.0]]
    assert (tmp_path / "c.png").stat().st_size > 10000
    # detection reports: mAP, higher is better
    det = curve_points([("yolo", _report(0.1) | {"eval": {"map50_95": {"value": 0.5}}})])
    assert plot_curves(det, tmp_path / "d.svg")["panels"] == ["mAP50-95"]
    with pytest.raises(UserError, match="no quality"):
        plot_curves(curve_points([("x", {"reduction": 0.1})]), tmp_path / "e.png")
    with pytest.raises(UserError, match="no such report"):
        curve_points(parse_specs(str(tmp_path / "nowhere")))


# ---------------------------------------------------------------------------- report.html
def _output_dir(known, tmp_path, with_graph=True) -> Path:
    dp, _, data, fp = known
    report = {"model": "random-llama:3", "params_before": 200000, "params_after": 150000, "reduction": 0.25,
              "target": 0.2, "reached": True, "score": "angular", "schedule": "paper", "granularity": "fine",
              "scoring_seconds": 1.5, "pruning_seconds": 0.5, "seconds": 2.5,
              "units": [{"unit": u, "units": [u], "kind": s.kind, "score": 0.1 * i, "params_removed": s.params_removed,
                         "reduction": 0.04 * i} for i, (u, s) in enumerate(zip(PLAN_UNITS, dp.steps), 1)],
              "eval": {"perplexity": {"value": 321.5, "command": "depthprune eval out"}, "latency_ms": 3.25,
                       "dense": {"perplexity": 128.0, "latency_ms": 4.0}},
              "sample": "To be, or not to be <b>&amp;</b>"}
    files = {"report.json": report, "graph.json": data}
    out = save_pruned(dp, tmp_path / "out", "random-llama:3", fp, files)
    if not with_graph:  # an output directory written before graph.json existed
        (out / "graph.json").unlink()
    return out


IMG = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]*)\"")
EXTERNAL = re.compile(r"(?:src|href|action|poster|data)\s*=\s*[\"']?\s*(?:https?:)?//", re.I)


@pytest.mark.unit
def test_report_html_is_self_contained(known, tmp_path):
    out = _output_dir(known, tmp_path)
    page_path = write_report(out)
    assert page_path == out / "report.html"
    page = page_path.read_text()
    assert not EXTERNAL.search(page)
    assert not re.search(r"https?://", page.replace("http://www.w3.org", ""))  # not even in text
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    srcs = IMG.findall(page)
    assert len(srcs) == 4  # map, whole model, most pruned block, curves
    kinds = []
    for src in srcs:
        m = re.fullmatch(r"data:(image/png|image/svg\+xml);base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:60]
        blob = base64.b64decode(m.group(2))
        kinds.append(m.group(1))
        if m.group(1) == "image/png":
            assert blob[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            (tmp_path / "img.svg").write_bytes(blob)
            states = svg_states(tmp_path / "img.svg")
            assert states  # a drawing with its node states
    assert kinds == ["image/png", "image/svg+xml", "image/svg+xml", "image/png"]
    # the most pruned block is block 2 (everything gone): its drawing holds its states exactly
    (tmp_path / "b.svg").write_bytes(base64.b64decode(srcs[2].split(",", 1)[1]))
    assert {n: s for n, s in svg_states(tmp_path / "b.svg").items() if n.startswith("model.layers.2")} == {
        "model.layers.2.input_layernorm": "identity", "model.layers.2.self_attn": "zero",
        "model.layers.2/add#0": "neutral", "model.layers.2.post_attention_layernorm": "identity",
        "model.layers.2.mlp.gate_proj": "identity", "model.layers.2.mlp.act_fn": "one",
        "model.layers.2.mlp.up_proj": "identity", "model.layers.2.mlp/mul#0": "neutral",
        "model.layers.2.mlp.down_proj": "zero", "model.layers.2/add#1": "neutral"}
    for u in PLAN_UNITS:  # the table of pruned units
        assert f"<td class=unit>{u}</td>" in page
    assert "321.5" in page and "depthprune eval out" in page and "paper" in page
    assert "To be, or not to be &lt;b&gt;&amp;amp;&lt;/b&gt;" in page  # escaped, not markup


@pytest.mark.unit
def test_report_without_graph_json_notes_it(known, tmp_path):
    out = _output_dir(known, tmp_path, with_graph=False)
    page = write_report(out).read_text()
    assert "No graph.json" in page and len(IMG.findall(page)) == 1  # the curves only
    page = write_report(out, graph=known[2]).read_text()  # a graph given by the caller
    assert len(IMG.findall(page)) == 4
    with pytest.raises(UserError, match="not a directory"):
        write_report(tmp_path / "nope")


@pytest.mark.integration
@pytest.mark.slow
def test_report_renders_in_headless_chromium(known, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    out = _output_dir(known, tmp_path)
    page = write_report(out)
    shot = tmp_path / "report.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    import matplotlib.image as mpimg
    img = mpimg.imread(shot)  # floats in [0, 1]
    assert img.shape[:2] == (2000, 1280)
    rgb = (img[..., :3] * 255).round()
    # the inlined pruning map rendered: cells in the identity colour #b03a2e are on screen
    identity = ((abs(rgb[..., 0] - 0xb0) <= 3) & (abs(rgb[..., 1] - 0x3a) <= 3) & (abs(rgb[..., 2] - 0x2e) <= 3))
    assert identity.sum() > 2000
    assert (rgb.sum(-1) < 600).mean() > 0.02  # text and figures, not a blank page
    print(f"screenshot: {shot}")


# ---------------------------------------------------------------------------- command line
def _parse(argv):
    p = argparse.ArgumentParser(prog="depthprune")
    sub = p.add_subparsers(dest="command", required=True)
    cli_viz.add_commands(sub)
    return p.parse_args(argv)


@pytest.mark.unit
def test_cli_viz_from_directory_and_spec(known, tmp_path, capsys):
    out = _output_dir(known, tmp_path)
    args = _parse(["viz", str(out), "--block", "2", "--out", str(tmp_path / "b2.graphml"), "--map",
                   str(tmp_path / "m.png"), "--curves", f"mine={out}", "--curves-out", str(tmp_path / "c.svg"),
                   "--report"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "grid, 3 x 7 cells" in printed and "wrote" in printed
    h = nx.read_graphml(tmp_path / "b2.graphml")
    assert h.nodes["model.layers.2.mlp.act_fn"]["state"] == "one"
    assert (tmp_path / "m.png").is_file() and (tmp_path / "c.svg").is_file() and (out / "report.html").is_file()
    with pytest.raises(UserError, match="exists"):
        args.func(args)
    # a directory without graph.json: the pruned model is loaded and its graph rebuilt
    (out / "graph.json").unlink()
    args = _parse(["viz", str(out), "--out", str(tmp_path / "g.json")])
    assert args.func(args) == 0
    rebuilt = json.loads((tmp_path / "g.json").read_text())
    assert {n["id"]: n["state"] for n in rebuilt["nodes"]} == \
        {n: d["state"] for n, d in select(load_graph(known[2])).nodes(data=True)}
    # a plain model spec: every node live
    args = _parse(["viz", "random-llama:2", "--expand", "--out", str(tmp_path / "spec.graphml")])
    assert args.func(args) == 0
    h = nx.read_graphml(tmp_path / "spec.graphml")
    assert h.number_of_nodes() == 24 and {d["state"] for _, d in h.nodes(data=True)} == {"live"}


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["viz", "random-llama:2"], "nothing to draw"),
    (["viz", "random-llama:2", "--out", "x.pdf"], "must end in"),
    (["viz", "random-llama:2", "--map", "x.jpg"], "must end in"),
    (["viz", "--out", "x.svg"], "need a DIR_OR_SPEC"),
    (["viz", "random-llama:2", "--report"], "needs an output directory"),
    (["viz", "random-llama:2", "--block", "7", "--out", "{tmp}/x.svg"], "outside the model's 2 blocks"),
    (["viz", "random-llama:2", "--blocks", "1:1", "--out", "{tmp}/x.svg"], "empty or outside"),
    (["viz", "random-llama:2", "--blocks", "a:b", "--out", "{tmp}/x.svg"], "integers"),
    (["viz", "--curves", "{tmp}/none.json", "--curves-out", "{tmp}/c.png"], "no such report"),
])
def test_cli_viz_user_errors(tmp_path, argv, message):
    args = _parse([a.replace("{tmp}", str(tmp_path)) for a in argv])
    with pytest.raises(UserError, match=message):
        args.func(args)
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.unit
def test_graph_dict_round_trip(known):
    g = load_graph(known[2])
    h = load_graph(graph_dict(g))
    assert dict(h.nodes(data=True)) == dict(g.nodes(data=True)) and set(h.edges) == set(g.edges)
    assert h.graph["blocks"] == g.graph["blocks"]


@pytest.mark.unit
def test_training_curve_of_a_healed_report(tmp_path):
    """report["finetune"]["curve"] -> the training loss and held-out KL series, drawn as one figure."""
    from depthprune.viz.curves import plot_training, training_points
    curve = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "heldout_kl": 0.3, "heldout_ppl": 40.0},
             {"step": 3, "loss": 1.2}, {"step": 4, "loss": 1.1, "heldout_kl": 0.2, "heldout_ppl": 35.0}]
    s = training_points({"finetune": {"curve": curve}})
    assert s == {"training loss": [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.1)],
                 "held-out KL to the teacher": [(2, 0.3), (4, 0.2)]}
    assert training_points({"finetune": {"map_after": {}}}) == {} and training_points({}) == {}
    plot_training(s, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
