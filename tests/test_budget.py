"""`prune --budget`: what a target counts (parameters, FLOPs, KV-cache bytes), checked against hand
counts and against what the KV cache really allocates; and block scores refusing parallel branches."""
import pytest
import torch
import torch.nn as nn

from cli_run import assert_one_line_error, run_cli
from depthprune.adapters.hf import kv_cache_bytes
from depthprune.adapters.load import load_model
from depthprune.blocks import BlockInputs, NotChained, chained_blocks
from depthprune.depth import DepthPruner
from depthprune.eval import calibration_batches
from depthprune.importance import PruneConfig, make_budget, prune_to_target
from depthprune.importance.budget import Flops


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


@pytest.mark.unit
def test_flops_of_a_pruned_toy_cnn_equal_a_hand_count():
    model, x = _conv_net(), torch.randn(1, 3, 8, 8)
    flops = Flops(lambda m, b: m(b), x, 1)
    pix = 8 * 8
    conv1, conv2, conv3, fc = 2 * 8 * 3 * 9 * pix, 2 * 8 * 8 * 9 * pix, 2 * 8 * 4 * 9 * pix, 2 * 8 * 4
    assert flops.measure(model) == conv1 + conv2 + conv3 + fc
    pruner = DepthPruner(model, (x,), lambda m, b: m(*b))
    pruner.prune("2")  # the middle convolution becomes an identity (8 -> 8 channels: no reconciliation)
    assert flops.measure(model) == conv1 + conv3 + fc


@pytest.mark.unit
def test_flops_of_a_decoder_per_token_equal_a_hand_count():
    lm = load_model("random-llama:2")
    c = lm.model.config
    d, inter, heads, kv, hd, vocab, T = c.hidden_size, c.intermediate_size, c.num_attention_heads, \
        c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.vocab_size, 20
    batches = calibration_batches(torch.randint(0, vocab, (2, T)), 2)
    budget = make_budget("flops", lm, batches)
    projections = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d)
    core = 2 * 2 * T * heads * hd  # QK^T and AV, per token
    mlp = 2 * 3 * d * inter
    assert budget.measure(lm.model) == 2 * (projections + core + mlp) + 2 * d * vocab
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    pruner.prune("model.layers.1.self_attn")
    assert budget.measure(lm.model) == 2 * (projections + core + mlp) + 2 * d * vocab - projections - core


@pytest.mark.unit
def test_kv_cache_bytes_equal_the_hand_count_and_what_generate_allocates():
    lm = load_model("random-llama:3")
    c = lm.model.config
    per_layer = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # keys and values, fp32
    assert kv_cache_bytes(lm.model) == 3 * per_layer
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    pruner.prune("model.layers.1.self_attn")
    assert kv_cache_bytes(lm.model) == 2 * per_layer
    ids = torch.randint(0, c.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    out = lm.model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, return_dict_in_generate=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    assert {t.shape[-2] for t in tensors} == {9}  # 6 prompt tokens + 3 fed back (the 4th is not)
    assert sum(t.numel() * t.element_size() for t in tensors) == 9 * 2 * per_layer


@pytest.mark.unit
def test_targets_count_the_budget():
    lm = load_model("random-llama:4")
    batches = calibration_batches(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)), 2)
    flops = make_budget("flops", lm, batches).measure(lm.model)
    _, out = prune_to_target(lm, PruneConfig(0.3, score="angular", schedule="shared", granularity="mixed",
                                             compensate=False, budget="flops"), batches, progress=False)
    assert out.budget == "flops" and out.cost_before == flops and out.reached
    assert out.cost_after == make_budget("flops", lm, batches).measure(lm.model) <= 0.7 * flops
    # the KV cache only shrinks with attention: no MLP is worth anything toward it
    lm = load_model("random-llama:4")
    _, out = prune_to_target(lm, PruneConfig(0.5, score="angular", schedule="shared", granularity="mixed",
                                             compensate=False, budget="kv-cache"), batches, progress=False)
    assert out.reached and out.cost_after == kv_cache_bytes(lm.model) == out.cost_before / 2
    assert {u["kind"] for u in out.applied} <= {"attention", "block"}


class Branches(nn.Module):
    """Three same-class heads on three inputs, side by side (a detection head's shape)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3))

    def forward(self, x):
        h = self.stem(x)
        return torch.cat([head(h * (i + 1)) for i, head in enumerate(self.heads)], -1)


@pytest.mark.unit
def test_parallel_branches_are_not_blocks_and_default_targets_score_outputs():
    model, x = Branches().eval(), torch.randn(2, 8)
    assert not chained_blocks(model, (x,), lambda m, b: m(*b))
    with pytest.raises(NotChained, match="do not run one after another"):
        BlockInputs(model, [(x,)], lambda m, b: m(*b))


@pytest.mark.integration
def test_cli_budget_errors_come_before_loading(tmp_path):
    r = run_cli(["prune", "--model", "random-llama:2", "--target", "0.2", "--latency-table", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "o")])
    assert_one_line_error(r, "add --budget latency")
    r = run_cli(["prune", "--model", "random-llama:2", "--target", "0.2", "--budget", "latency", "--latency-table",
                 str(tmp_path / "t.json"), "--out", str(tmp_path / "o")])
    assert_one_line_error(r, "no such latency table")
    r = run_cli(["prune", "--model", "random-llama:2", "--units", "model.layers.0.self_attn", "--budget", "flops",
                 "--out", str(tmp_path / "o")])
    assert_one_line_error(r, "--units are applied as given")
    r = run_cli(["prune", "--model", "random-llama:2", "--target", "0.2", "--budget", "flops", "--schedule",
                 "window", "--granularity", "block", "--score", "angular", "--out", str(tmp_path / "o")])
    assert_one_line_error(r, "counts parameters")
    r = run_cli(["prune", "--model", "yolov5n.yaml", "--target", "0.1", "--budget", "kv-cache", "--score", "output",
                 "--calib-samples", "1", "--out", str(tmp_path / "o")])
    assert_one_line_error(r, "has none")
    assert not (tmp_path / "o").exists()
