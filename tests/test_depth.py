"""Prune(f): exact equivalences, exact parameter counts, property tests on several architectures."""
import copy
import json
import random

import pytest
import torch
import torch.nn as nn

from depthprune.adapters.load import load_model
from depthprune.adapters.hf import random_llama, renumber_attention_layers, wrap
from depthprune.depth import DepthPruner, count_params
from depthprune.depth.plan import fingerprint, replay_plan, plan_dict
from depthprune.io.model_dir import load_pruned, save_pruned
from depthprune.errors import UserError
from cli_run import run_cli


def llama_pruner(model):
    lm = wrap(model, "random-llama")
    return DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, on_change=renumber_attention_layers), lm


def delete_layer(model, b):
    ref = copy.deepcopy(model)
    del ref.model.layers[b]
    ref.config.num_hidden_layers -= 1
    renumber_attention_layers(ref)
    return ref


def skip_sublayer(model, b, which):
    """Reference model whose layer b skips its attention or its MLP sublayer."""
    ref = copy.deepcopy(model)
    layer = ref.model.layers[b]
    if which == "mlp":
        layer.mlp = _ZeroLike()
    else:
        layer.self_attn = _ZeroAttention()
    return ref


class _ZeroLike(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class _ZeroAttention(nn.Module):
    def forward(self, hidden_states, **kw):
        return torch.zeros_like(hidden_states), None


BLOCK = ["self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def assert_prunes_to(base, units, reference):
    """Pruning `units` of a copy of `base` gives the logits of `reference` (fp32, <= 1e-5)."""
    dp, lm = llama_pruner(copy.deepcopy(base))
    for u in units:
        dp.prune(u)
    ids = lm.example_inputs[0]
    assert (logits(dp.model, ids) - logits(reference, ids)).abs().max() <= 1e-5


@pytest.mark.unit
@pytest.mark.parametrize("b", [0, 1, 2])
@pytest.mark.parametrize("order", [BLOCK, BLOCK[::-1], ["mlp.up_proj", "self_attn", "mlp.down_proj", "mlp.gate_proj"]])
def test_full_block_equals_deleting_it(b, order):
    base = random_llama(3)
    assert_prunes_to(base, [f"model.layers.{b}.{u}" for u in order], delete_layer(base, b))


@pytest.mark.unit
@pytest.mark.parametrize("which,units", [("attn", ["self_attn"]), ("mlp", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
                                         ("mlp", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"])])
def test_sublayer_equivalence(which, units):
    base = random_llama(2)
    assert_prunes_to(base, [f"model.layers.1.{u}" for u in units], skip_sublayer(base, 1, which))


def check_single_mlp_prune(dp, lm, unit, hidden):
    promised = dp.promised_params(unit)
    before = count_params(dp.model)
    dp.prune(unit)
    assert before - count_params(dp.model) == promised
    mlp = dp.model.get_submodule(unit.rsplit(".", 1)[0])
    for name in ("gate_proj", "up_proj", "down_proj"):
        m = getattr(mlp, name)
        if isinstance(m, nn.Linear):
            assert (m.in_features, m.out_features) == (hidden, hidden)
    out = logits(dp.model, lm.example_inputs[0])
    assert torch.isfinite(out).all()
    return promised


@pytest.mark.unit
@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_single_mlp_transform_random(proj):
    dp, lm = llama_pruner(random_llama(2))
    promised = check_single_mlp_prune(dp, lm, f"model.layers.0.mlp.{proj}", 64)
    assert promised == 64 * 128 + 2 * 64 * 64  # the unit + the two 64-wide width sections


@pytest.mark.integration
@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_single_mlp_transform_smollm2(smollm2, proj):
    model = copy.deepcopy(smollm2.model)
    dp = DepthPruner(model, smollm2.example_inputs, smollm2.forward_fn, on_change=renumber_attention_layers)
    lm = copy.copy(smollm2)
    lm.model = model
    promised = check_single_mlp_prune(dp, lm, f"model.layers.4.mlp.{proj}", 576)
    assert promised == 1_990_656


@pytest.mark.integration
def test_smollm2_block_equals_deletion(smollm2):
    base = smollm2.model
    model = copy.deepcopy(base)
    dp = DepthPruner(model, smollm2.example_inputs, smollm2.forward_fn, on_change=renumber_attention_layers)
    for u in BLOCK:
        dp.prune(f"model.layers.7.{u}")
    ids = smollm2.example_inputs[0]
    assert (logits(model, ids) - logits(delete_layer(base, 7), ids)).abs().max() <= 1e-5


@pytest.mark.unit
def test_generate_with_kv_cache_matches_deleted_layer():
    base = random_llama(3)
    dp, lm = llama_pruner(copy.deepcopy(base))
    for u in BLOCK:
        dp.prune(f"model.layers.0.{u}")
    ref = delete_layer(base, 0)
    ids = lm.example_inputs[0][:, :6]
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    for m in (dp.model, ref):
        m.config.use_cache = True
        m.generation_config.pad_token_id = 0
    a = dp.model.generate(ids, **kw)
    b = ref.generate(ids, **kw)
    assert torch.equal(a, b)
    # and the cache mattered: same tokens without it
    assert torch.equal(a, ref.generate(ids, **{**kw, "use_cache": False}))


@pytest.mark.unit
def test_zero_unit_prune_is_bit_identical():
    base = random_llama(2)
    dp, lm = llama_pruner(copy.deepcopy(base))
    ids = lm.example_inputs[0]
    assert torch.equal(logits(dp.model, ids), logits(base, ids))


@pytest.mark.unit
def test_plan_round_trip(tmp_path):
    lm = load_model("random-llama:2")
    fp = fingerprint(lm.model)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, on_change=renumber_attention_layers)
    for u in ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn", "model.layers.1.mlp.down_proj"):
        dp.prune(u)
    save_pruned(dp, tmp_path / "p", "random-llama:2", fp)
    with pytest.raises(UserError):
        save_pruned(dp, tmp_path / "p", "random-llama:2", fp)
    lm2, dp2 = load_pruned(tmp_path / "p")
    ids = lm.example_inputs[0]
    assert torch.equal(logits(lm2.model, ids), logits(dp.model, ids))
    assert str(lm2.model) == str(dp.model)
    assert count_params(lm2.model) == count_params(dp.model)
    # replaying on a fresh base reproduces the structure
    fresh = load_model("random-llama:2")
    dp3 = replay_plan(plan_dict(dp, "random-llama:2", fp), fresh.model, fresh.example_inputs, fresh.forward_fn)
    assert [(k, v.shape) for k, v in dp3.model.state_dict().items()] == \
        [(k, v.shape) for k, v in dp.model.state_dict().items()]
    # a plan for another base model is refused
    other = load_model("random-llama:3")
    with pytest.raises(UserError, match="fingerprint"):
        replay_plan(plan_dict(dp, "random-llama:2", fp), other.model, other.example_inputs, other.forward_fn)


def random_sequences(lm, seeds, steps, check):
    """Random prune sequences; every step removes exactly what it promised. Returns the pruners."""
    base = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)
    done = []
    for seed in seeds:
        dp = copy.deepcopy(base)
        rng = random.Random(seed)
        for _ in range(steps):
            live = [u for u in dp.units() if dp.why_not(u) is None]
            if not live:
                break
            unit = rng.choice(live)
            try:
                promised = dp.promised_params(unit)
                assert dp.prune(unit).params_removed == promised, unit
            except UserError as e:  # refused cleanly; the model must be left intact
                assert "width reconciliation" in str(e)
                assert dp.why_not(unit) is not None
            check(dp.model)
        done.append(dp)
    return done


@pytest.mark.integration
@pytest.mark.slow
def test_yolov5n_every_candidate_alone_and_random_sequences():
    from depthprune.adapters.yolo import load_yolo
    lm = load_yolo("yolov5n.yaml", imgsz=256)  # three detection levels at 8/16/32 px strides
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        ref = lm.model(x)
    base = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)
    cands = base.candidates()
    yes = [c for c in cands if c.candidate]
    assert len([c for c in cands if c.kind == "transform"]) == 76
    assert len(yes) == 50 and sum(c.in_width != c.out_width for c in yes) == 20
    assert all("model.24" not in c.unit for c in yes)
    assert next(c for c in cands if c.unit == "model.24.dfl.conv").candidate is False

    def check(model):
        with torch.no_grad():
            out = model(x)
        assert out[0].shape == ref[0].shape
        assert [t.shape for t in out[1]["boxes"]] if isinstance(out[1], dict) else True

    before = count_params(base.model)
    for c in yes:  # each alone, inside a trial that rolls back exactly
        with base.trial([c.unit]):
            assert before - count_params(base.model) == c.params_removed, c.unit
            check(base.model)
        with torch.no_grad():
            assert torch.equal(base.model(x)[0], ref[0]), c.unit
    dp = copy.deepcopy(base)  # a pruning session can be copied (its DepGraph cache is not)
    assert dp.prune(yes[0].unit).params_removed == yes[0].params_removed
    runs = random_sequences(lm, seeds=[0, 1, 2, 3], steps=25, check=check)
    # C3 blocks whose branches are all pruned concatenate one value twice: patched with Empty
    assert any(op.get("with", {}).get("state") == "empty" for dp in runs for s in dp.steps for op in s.ops)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_unseen_cnns_random_sequences(arch):
    tv = pytest.importorskip("torchvision")
    from depthprune.adapters.base import LoadedModel
    torch.manual_seed(0)
    m = getattr(tv.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    lm = LoadedModel(model=m, example_inputs=(x,), spec=arch)

    def check(model):
        with torch.no_grad():
            assert model(x).shape == (1, 1000)
    random_sequences(lm, seeds=[0, 1], steps=20, check=check)


@pytest.mark.integration
def test_unseen_bert_random_sequences():
    from conftest import tiny_bert
    from depthprune.adapters.base import LoadedModel
    m, inputs = tiny_bert(3)
    lm = LoadedModel(model=m, example_inputs=inputs, spec="bert",
                     forward_fn=lambda model, i: model(**i).last_hidden_state)

    def check(model):
        with torch.no_grad():
            assert model(**inputs).last_hidden_state.shape == (1, 8, 32)
    random_sequences(lm, seeds=[0, 1, 2], steps=8, check=check)


@pytest.mark.unit
def test_cli_candidates_and_prune(tmp_path):
    r = run_cli(["candidates", "--model", "random-llama:2", "--json"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["summary"]["candidates"] == 8
    out = tmp_path / "pruned"
    units = "model.layers.1.self_attn,model.layers.1.mlp.up_proj"
    r = run_cli(["prune", "--model", "random-llama:2", "--units", units, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in rep["units"]] == units.split(",")
    assert rep["params_before"] - rep["params_after"] == sum(u["params_removed"] for u in rep["units"])
    assert (out / "model.safetensors").is_file() and (out / "plan.json").is_file()
    r = run_cli(["prune", "--model", "random-llama:2", "--units", "model.layers.0.self_attn.q_proj",
                 "--out", str(tmp_path / "bad")])
    assert r.returncode == 2 and "not a unit" in r.stderr or "no unit" in r.stderr
    assert not (tmp_path / "bad").exists()


class CatNet(nn.Module):
    """stem -> two branches of the same input -> cat -> BN -> head (a C3-like split)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()
        self.b = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.bn(torch.cat([self.act(self.a(x)), self.b(x)], 1)))


@pytest.mark.unit
def test_concat_of_one_value_is_patched_with_empty(tmp_path):
    torch.manual_seed(0)
    net = CatNet().eval()
    with torch.no_grad():  # a BN with non-trivial statistics
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(net)
    dp = DepthPruner(net, (x,))
    dp.prune("a")  # a and its ReLU (FindAct) go: cat(x, b(x)) still has two origins
    assert dp.model.head.in_channels == 16 and isinstance(dp.model.act, type(dp.model.a))
    promised = dp.promised_params("b")
    step = dp.prune("b")  # cat(x, x): one origin, patched to cat(x, empty)
    assert step.params_removed == promised
    assert ("neutral", "root/cat#0") in [(op["op"], op.get("node")) for op in step.ops]
    empty = next(op for op in step.ops if op.get("with", {}).get("state") == "empty")
    assert empty["node"] == "act" and empty["with"]["dim"] == 1  # the longer operand path goes
    # the BN and the head lose the emptied operand's section, exactly
    assert dp.model.head.in_channels == 8 and dp.model.bn.num_features == 8
    assert step.params_removed == 8 * 8 + 8 + 4 * 8 + 2 * 8
    assert count_params(dp.model) == count_params(ref) - 2 * (8 * 8 + 8) - 4 * 8 - 2 * 8
    kept = slice(8, 16)
    with torch.no_grad():
        bn = ref.bn
        h = ref.stem(x)
        z = (h - bn.running_mean[kept, None, None]) / torch.sqrt(bn.running_var[kept, None, None] + bn.eps)
        z = z * bn.weight[kept, None, None] + bn.bias[kept, None, None]
        want = nn.functional.conv2d(z, ref.head.weight[:, kept], ref.head.bias)
        assert (dp.model(x) - want).abs().max() <= 1e-5
    # the plan replays on a fresh copy, Empty and the consumers' widths included
    dp2 = DepthPruner(copy.deepcopy(ref), (x,))
    dp2.replay([s.as_dict() for s in dp.steps])
    with torch.no_grad():
        assert torch.equal(dp2.model(x), dp.model(x))


@pytest.mark.unit
def test_reconciliation_classes_exact_sum_without_emptying():
    from depthprune.depth.reconcile import _choose_classes
    A, B = ("A", "out"), ("B", "out")
    # three singletons of layer A (width 3) and two classes of four channels of layer B (width 2)
    classes = [[0], [1], [2], [3, 4, 5, 6], [7, 8, 9, 10]]
    takes = {0: [A], 1: [A], 2: [A], **{r: [B] for r in range(3, 11)}}
    width = {A: 3, B: 2}
    scores = [0.0, 0.1, 0.2, 0.3, 0.4]
    # k = 5 needs one class of four and one singleton; A keeps its last channel (2), B its last class
    assert _choose_classes(classes, scores, 5, takes, width) == [0, 3, 4, 5, 6]
    assert _choose_classes(classes, scores, 2, takes, width) == [0, 1]
    assert _choose_classes(classes, scores, 3, takes, width) is None  # only 0,1 and 4s: 3 = impossible
    assert _choose_classes(classes, scores, 7, takes, width) is None  # would empty a layer
    # singletons only: the k lowest
    assert _choose_classes([[0], [1], [2]], [0.0, 0.1, 0.2], 2, {}, {}) == [0, 1]


class PostNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(self.stem(x)))))


@pytest.mark.unit
@pytest.mark.parametrize("post_norm", ["unit", "keep"])
def test_post_norm_choice(post_norm):
    torch.manual_seed(0)
    net = PostNormNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    ref = copy.deepcopy(net)
    dp = DepthPruner(net, (x,), recipe={"post_norm": post_norm})
    promised = dp.promised_params("conv")
    assert dp.prune("conv").params_removed == promised
    with torch.no_grad():
        h = ref.stem(x)
        want = ref.head(h if post_norm == "unit" else ref.bn(h))  # the activation goes either way
        assert (dp.model(x) - want).abs().max() <= 1e-6
    assert promised == 8 * 8 * 9 + 8 + (16 if post_norm == "unit" else 0)
    with pytest.raises(UserError, match="post_norm"):
        DepthPruner(PostNormNet(), (x,), recipe={"post_norm": "drop"})
