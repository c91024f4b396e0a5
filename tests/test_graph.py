"""The computation graph on Llama (random and real), YOLOv5n, and models never seen."""
import collections
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from depthprune.adapters.load import load_model
from depthprune.graph import CompGraph
from depthprune.io.goldens import GOLDEN_SPECS, graphml_text
from cli_run import run_cli

ROOT = Path(__file__).resolve().parents[1]


def graph_of(lm):
    return CompGraph(lm.model, lm.example_inputs, lm.forward_fn)


def layer_kinds(G, i):
    pre = (f"model.layers.{i}.", f"model.layers.{i}/")
    c = collections.Counter()
    for n, d in G.g.nodes(data=True):
        if n.startswith(pre):
            c[d["kind"] if d["kind"] != "arith" else d["op"]] += 1
    return c


EXPECTED_LAYER = {"attention": 1, "transform": 3, "activation": 1, "norm": 2, "mul": 1, "add": 2}


def check_llama(G, layers):
    for i in range(layers):
        assert dict(layer_kinds(G, i)) == EXPECTED_LAYER, i
        assert G.g.nodes[f"model.layers.{i}.self_attn"]["kind"] == "attention"
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert G.g.nodes[f"model.layers.{i}.mlp.{p}"]["kind"] == "transform"
    s = G.summary()
    assert s["attention"] == layers
    assert s["transforms"] == 3 * layers + 1  # + lm_head
    assert s["norms"] == 2 * layers + 1       # + final norm
    assert s["activations"] == layers and s["arithmetic"] == 3 * layers
    assert s["embeddings"] == 1
    assert G.g.nodes["lm_head"]["is_output"]
    # No q/k/v/o node escapes its attention unit.
    assert not [n for n in G.g if re.search(r"\.(q|k|v|o)_proj$", n)]


@pytest.mark.unit
@pytest.mark.parametrize("layers", [1, 3])
def test_random_llama_partition(layers):
    check_llama(graph_of(load_model(f"random-llama:{layers}")), layers)


@pytest.mark.unit
def test_llama_glu_edges():
    G = graph_of(load_model("random-llama:1"))
    g = G.g
    assert set(g.successors("model.layers.0.post_attention_layernorm")) == {
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert list(g.successors("model.layers.0.mlp.gate_proj")) == ["model.layers.0.mlp.act_fn"]
    assert set(g.predecessors("model.layers.0.mlp/mul#0")) == {"model.layers.0.mlp.act_fn", "model.layers.0.mlp.up_proj"}
    assert set(g.predecessors("model.layers.0/add#0")) == {"model.embed_tokens", "model.layers.0.self_attn"}
    assert g.nodes["model.layers.0.mlp.act_fn"]["module"] == "model.layers.0.mlp.act_fn"


@pytest.mark.integration
def test_smollm2_partition(smollm2):
    check_llama(graph_of(smollm2), 30)


@pytest.mark.integration
def test_yolov5n_partition():
    lm = load_model("yolov5n.yaml")
    G = graph_of(lm)
    m = lm.model
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    bns = [n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d)]
    assert (len(convs), len(bns)) == (76, 69)
    assert sorted(G.nodes_of("transform")) == sorted(convs)
    assert sorted(G.nodes_of("norm")) == sorted(bns)
    # One activation per SiLU call site (one shared SiLU instance), plus Detect's functional sigmoid.
    conv_blocks = [n for n, x in m.named_modules() if type(x).__name__ == "Conv"]
    assert len({id(x.act) for n, x in m.named_modules() if type(x).__name__ == "Conv"}) == 1
    acts = G.nodes_of("activation")
    assert sorted(a for a in acts if a.endswith(".act")) == sorted(f"{c}.act" for c in conv_blocks)
    assert all(G.g.nodes[f"{c}.act"]["module"] == f"{c}.act" for c in conv_blocks)
    # Every torch.cat is a concat node: 4 Concat modules, 8 C3, 1 SPPF, and Detect's own cats.
    cats = G.nodes_of("concat")
    concat_modules = [n for n, x in m.named_modules() if type(x).__name__ == "Concat"]
    c3 = [n for n, x in m.named_modules() if type(x).__name__ == "C3"]
    assert len(concat_modules) == 4 and len(c3) == 8
    for name in concat_modules + c3 + ["model.9"]:
        assert f"{name}/cat#0" in cats, name
    # Every Bottleneck shortcut is an add.
    shortcuts = [n for n, x in m.named_modules() if type(x).__name__ == "Bottleneck" and x.add]
    assert len(shortcuts) == 7
    adds = [n for n in G.nodes_of("arith") if G.g.nodes[n]["op"] == "add" and not n.startswith("model.24")]
    assert sorted(adds) == sorted(f"{s}/add#0" for s in shortcuts)


@pytest.mark.integration
def test_unseen_resnet18():
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet18(weights=None).eval()
    G = CompGraph(m, (torch.randn(1, 3, 64, 64),))
    s = G.summary()
    convs = sum(isinstance(x, nn.Conv2d) for x in m.modules())
    assert s["transforms"] == convs + 1  # + fc
    assert s["norms"] == sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert s["arithmetic"] == 8  # one residual add per BasicBlock
    assert s["attention"] == 0 and s["activations"] == 17  # 2 per block + stem
    # BasicBlock calls one ReLU module twice: call sites get distinct ids but cannot be swapped alone.
    assert G.g.nodes["layer1.0.relu"]["module"] == "" and "layer1.0.relu@1" in G.g


@pytest.mark.integration
def test_unseen_bert_encoder():
    from conftest import tiny_bert
    m, inputs = tiny_bert(2)
    G = CompGraph(m, inputs)
    att = G.nodes_of("attention")
    assert att == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    ts = G.nodes_of("transform")
    for i in range(2):
        for t in ("attention.output.dense", "intermediate.dense", "output.dense"):
            assert f"encoder.layer.{i}.{t}" in ts
    assert G.summary()["norms"] == 1 + 2 * 2  # embeddings LN + two per layer
    assert G.g.nodes["encoder.layer.0.intermediate.intermediate_act_fn"]["kind"] == "activation"


@pytest.mark.unit
def test_graph_code_names_no_architecture():
    words = re.compile(r"llama|yolo|ultralytics|bert|resnet|detect|smollm|gpt|mistral|qwen", re.I)
    for f in (ROOT / "depthprune" / "graph").glob("*.py"):
        assert not words.search(f.read_text()), f


@pytest.mark.integration
@pytest.mark.parametrize("fname", sorted(GOLDEN_SPECS))
def test_goldens_are_current(fname):
    golden = (ROOT / "graphs" / fname).read_text()
    assert graphml_text(GOLDEN_SPECS[fname]) == golden, (
        f"graph of {GOLDEN_SPECS[fname]} changed: run `make goldens` and review the diff")


@pytest.mark.unit
def test_cli_graph_json_and_errors(tmp_path):
    r = run_cli(["graph", "--model", "random-llama:2", "--json", "--out", str(tmp_path / "g.graphml")])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("nodes", "edges", "transforms", "activations", "norms", "arithmetic", "concat", "attention"):
        assert isinstance(d[k], int)
    assert d["attention"] == 2 and d["transforms"] == 7
    assert (tmp_path / "g.graphml").stat().st_size > 0
    r = run_cli(["graph", "--model", "random-llama:2", "--out", str(tmp_path / "g.graphml")])
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
    for bad in ("no-such-model", "python:os:nope", "missing.gguf", "/nonexistent/dir/model.pt"):
        r = run_cli(["graph", "--model", bad])
        assert r.returncode == 2, bad
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("depthprune: error:"), r.stderr
