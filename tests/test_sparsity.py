"""Intra-layer pruners: metrics as pure functions, exact sparsity patterns, calibration order."""
import json

import pytest
import torch
import torch.nn as nn

from depthprune.adapters.load import load_model
from depthprune.cli import main
from depthprune.eval import calibration_batches
from depthprune.sparsity import InputStats, bias_correction, explain, nm_mask, prune_layer, sparsify, unstructured_mask
from depthprune.sparsity.metrics import (stade_consistent_metric, stade_metric, stade_nobias_metric,
                                         wanda_metric)

pytestmark = pytest.mark.unit


def test_input_stats_merge_batches_exactly():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 7) * 3 + 1000  # large mean: the naive sum of squares would cancel
    s = InputStats(7)
    for part in x.split([1, 2], dim=0):
        s.add(part)
    flat = x.reshape(-1, 7).double()
    assert s.count == 150
    torch.testing.assert_close(s.mean, flat.mean(0))
    torch.testing.assert_close(s.centred_sq_norm, (flat - flat.mean(0)).pow(2).sum(0))
    torch.testing.assert_close(s.sq_norm, flat.pow(2).sum(0))


def test_wanda_and_stade_metrics_by_hand():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    X = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # column norms sqrt(10), sqrt(8); means 2, 2; std 1, 0
    s = InputStats(2)
    s.add(X)
    torch.testing.assert_close(wanda_metric(W, s.sq_norm),
                               torch.tensor([[10 ** .5, 2 * 8 ** .5], [3 * 10 ** .5, .5 * 8 ** .5]]))
    torch.testing.assert_close(stade_metric(W, s, centred=False), torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(stade_metric(W, s, centred=True), wanda_metric(W, s.sq_norm))
    # printed Eq. 12: (||X_j - mu_j||^2 + mu_j^2) W^2 = (2 + 4) * 1, (0 + 4) * 4, ...
    torch.testing.assert_close(stade_nobias_metric(W, s.centred_sq_norm, s.mean),
                               torch.tensor([[6.0, 16.0], [54.0, 1.0]]))


def test_consistent_stade_nobias_ranks_exactly_like_wanda_but_printed_form_does_not():
    torch.manual_seed(1)
    X = torch.randn(64, 32) * torch.rand(32) * 4 + torch.randn(32) * 3
    W = torch.randn(16, 32)
    s = InputStats(32)
    s.add(X)
    var = s.centred_sq_norm / s.count
    wanda = unstructured_mask(wanda_metric(W, s.sq_norm), 0.5)
    assert torch.equal(unstructured_mask(stade_consistent_metric(W, var, s.mean), 0.5), wanda)
    assert not torch.equal(unstructured_mask(stade_nobias_metric(W, s.centred_sq_norm, s.mean), 0.5), wanda)


def test_unstructured_mask_prunes_exact_lowest_fraction_per_row():
    torch.manual_seed(2)
    metric = torch.rand(10, 40)
    mask = unstructured_mask(metric, 0.3)
    assert mask.sum(1).tolist() == [12] * 10
    # every pruned metric is below every kept one, row by row
    for row, m in zip(metric, mask):
        assert row[m].max() < row[~m].min()
    assert unstructured_mask(metric, 0.3, extra=1).sum(1).tolist() == [13] * 10
    assert not unstructured_mask(metric, 0.0).any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
def test_nm_mask_has_n_zeros_per_group(n, m):
    torch.manual_seed(3)
    metric = torch.rand(6, 4 * m)
    mask = nm_mask(metric, n, m)
    assert (mask.reshape(6, 4, m).sum(2) == n).all()
    groups = metric.reshape(6, 4, m)
    gm = mask.reshape(6, 4, m)
    assert (groups.masked_fill(~gm, -1).amax(2) < groups.masked_fill(gm, 2).amin(2)).all()
    extra = nm_mask(metric, n, m, extra=1).reshape(6, 4, m)
    assert (extra.sum(2) >= n).all() and extra.sum((1, 2)).tolist() == [4 * n + 1] * 6


def test_stade_bias_correction_error_matches_derivation():
    """Orthogonal centred input columns with a known mean: the corrected layer's error has zero
    mean and squared norm sum_{j pruned} W_ij^2 ||X_j - mu_j||^2, exactly as derived."""
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # 8x8 Hadamard
    scale = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0, 1.5, 0.7])
    mu = torch.tensor([2.0, -1.0, 0.5, 4.0, 0.0, -3.0, 1.0])
    Xc = h[:, 1:] * scale  # 8 tokens, 7 features; columns centred and mutually orthogonal
    X = (Xc + mu).double()
    torch.manual_seed(4)
    layer = nn.Linear(7, 3, bias=False).double()
    W = layer.weight.detach().clone()
    s = InputStats(7)
    s.add(X)
    torch.testing.assert_close(s.mean, mu.double())
    r = prune_layer(layer, "stade", centred=False, stats=s, sparsity=3 / 7)
    mask = layer.weight == 0
    assert r["bias_added"] and mask.sum(1).tolist() == [4, 4, 4]  # 3 + 1 extra per added bias
    torch.testing.assert_close(layer.bias.detach(), (W * mask) @ mu.double())
    err = X @ W.T - layer(X).detach()  # dense - pruned
    torch.testing.assert_close(err.mean(0), torch.zeros(3, dtype=torch.double))
    predicted = ((W * mask).pow(2) * s.centred_sq_norm).sum(1)
    torch.testing.assert_close(err.pow(2).sum(0), predicted)
    # without the correction the error's mean is the pruned weights times the means
    torch.testing.assert_close(bias_correction(W, mask, s.mean), (X @ (W * mask).T).mean(0))


def _llama_batches(layers=3, n=8, seq=24):
    lm = load_model(f"random-llama:{layers}")
    g = torch.Generator().manual_seed(5)
    return lm, calibration_batches(torch.randint(0, 128, (n, seq), generator=g), 4)


def _reference_sparsify(model, method, batches, sparsity):
    """Naive reference: full forwards (no block cache), one block at a time."""
    rows = {r["layer"]: r["centred"] for r in explain(model, batches[0], lambda m, b: m(input_ids=b[0]))
            if r["skip"] is None}
    for b in range(len(model.model.layers)):
        mine = [p for p in rows if p.startswith(f"model.layers.{b}.")]
        stats = {p: InputStats(model.get_submodule(p).in_features) for p in mine}
        hs = [model.get_submodule(p).register_forward_pre_hook(lambda _m, a, s=stats[p]: s.add(a[0])) for p in mine]
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch[0])
        for h in hs:
            h.remove()
        for p in mine:
            prune_layer(model.get_submodule(p), method, rows[p], stats[p], sparsity)


@pytest.mark.parametrize("method", ["wanda", "stade", "stade-nobias"])
def test_block_by_block_calibration_equals_full_forwards(method):
    lm, batches = _llama_batches()
    ref = load_model("random-llama:3").model
    _reference_sparsify(ref, method, batches, 0.5)
    sparsify(lm.model, method, lm.example_inputs, lm.forward_fn, batches, sparsity=0.5, progress=False)
    for (n, p), (_, q) in zip(lm.model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p == 0, q == 0), n
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_exact_sparsity_skips_head_and_embeddings_and_stade_keeps_wandas_nonzero_count():
    counts = {}
    for method in ("wanda", "stade"):
        for sparsity, pattern in ((0.5, None), (None, "2:4")):
            lm, batches = _llama_batches()
            head = lm.model.lm_head.weight.clone()
            emb = lm.model.model.embed_tokens.weight.clone()
            res = sparsify(lm.model, method, lm.example_inputs, lm.forward_fn, batches,
                           sparsity=sparsity, pattern=pattern, progress=False)
            assert len(res["layers"]) == 3 * 7
            for path, row in res["layers"].items():
                W = lm.model.get_submodule(path).weight
                zeros = (W == 0)
                extra = 1 if row["bias_added"] else 0
                if pattern:
                    assert (zeros.reshape(W.shape[0], -1, 4).sum(2) >= 2).all()
                    assert zeros.sum(1).tolist() == [W.shape[1] // 2 + extra] * W.shape[0]
                else:
                    assert zeros.sum(1).tolist() == [W.shape[1] // 2 + extra] * W.shape[0]
            assert torch.equal(lm.model.lm_head.weight, head) and torch.equal(lm.model.model.embed_tokens.weight, emb)
            counts[method, pattern] = sum(int(torch.count_nonzero(p)) for p in lm.model.parameters())
    assert counts["stade", None] == counts["wanda", None]
    assert counts["stade", "2:4"] == counts["wanda", "2:4"]


def test_depth_pruned_model_sparsifies_only_surviving_layers(tmp_path):
    from depthprune.depth import DepthPruner
    from depthprune.depth.plan import fingerprint
    from depthprune.io.model_dir import load_pruned, save_pruned
    lm, batches = _llama_batches()
    fp = fingerprint(lm.model)
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)
    pruner.prune("model.layers.1.self_attn")
    pruner.prune("model.layers.2.mlp.down_proj")
    save_pruned(pruner, tmp_path / "pruned", "random-llama:3", fp)
    out = tmp_path / "sparse"
    assert main(["sparsify", "--model", str(tmp_path / "pruned"), "--method", "stade", "--sparsity", "0.5",
                 "--calib-samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    layers = {r["layer"] for r in report["layers"]}
    assert not any(l.startswith("model.layers.1.self_attn") for l in layers)
    assert "model.layers.2.mlp.down_proj" not in layers and len(layers) == 3 * 7 - 4 - 1
    assert report["nonzero_after"] < report["nonzero_before"] and report["method"] == "stade"
    # reload: plan replayed, STADE biases restored, outputs identical to sparsifying in memory
    from types import SimpleNamespace
    from depthprune.cli.sparsify import calib_batches
    mem, _ = load_pruned(tmp_path / "pruned")
    args = SimpleNamespace(calib="shakespeare:calib", calib_samples=4, seq_len=32, batch_size=8)
    sparsify(mem.model, "stade", mem.example_inputs, mem.forward_fn, calib_batches(mem, args), sparsity=0.5,
             progress=False)
    lm2, _ = load_pruned(out)
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(lm2.model(input_ids=x).logits, mem.model(input_ids=x).logits, atol=0, rtol=0)
    added = json.loads((out / "sparsity.json").read_text())["added_bias"]
    assert added and all(lm2.model.get_submodule(p).bias is not None for p in added)
    W = lm2.model.model.layers[0].mlp.up_proj.weight
    assert (W == 0).sum(1).tolist() == [W.shape[1] // 2] * W.shape[0]


def test_sparsify_cli_rejects_bad_input(tmp_path, capsys):
    base = ["sparsify", "--model", "random-llama:2", "--out", str(tmp_path / "o")]
    assert main(base + ["--pattern", "4:2"]) == 2
    assert "0 < N < M" in capsys.readouterr().err
    assert main(base) == 2
    assert "exactly one of --sparsity or --pattern" in capsys.readouterr().err
    assert main(base + ["--sparsity", "1.5"]) == 2
    assert main(base + ["--pattern", "2:3", "--calib-samples", "2", "--seq-len", "16"]) == 2
    assert "not a multiple of M=3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,sparsity,pattern", [("wanda", 0.5, None), ("stade", None, "2:4")])
def test_transposed_conv1d_layers_sparsify_exactly_like_the_linears_they_equal(method, sparsity, pattern):
    """GPT-2 keeps its projections in Hugging Face's transposed ``Conv1D`` (weight ``[in, out]``):
    each is sparsified exactly as the ``nn.Linear`` computing the same map (the same zeros,
    transposed; N:M groups along the inputs; the same outputs after)."""
    import copy
    from archs import DECODERS, VOCAB
    from transformers.pytorch_utils import Conv1D
    from depthprune.adapters.hf import wrap
    conv = wrap(DECODERS["gpt2"]().model, "zoo:gpt2").model
    lin = copy.deepcopy(conv)
    for path, m in list(lin.named_modules()):
        if isinstance(m, Conv1D):
            new = nn.Linear(*m.weight.shape)
            new.weight.data, new.bias.data = m.weight.data.T.contiguous(), m.bias.data.clone()
            lin.set_submodule(path, new)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (8, 24), generator=g)
    fwd = lambda m, b: m(input_ids=b[0], use_cache=False).logits
    torch.testing.assert_close(fwd(conv, (ids,)), fwd(lin, (ids,)))
    batches = calibration_batches(ids, 4)
    got = {}
    for name, model in (("conv", conv), ("lin", lin)):
        got[name] = sparsify(model, method, (ids[:1],), fwd, batches, sparsity=sparsity, pattern=pattern,
                             progress=False)["layers"]
    assert list(got["conv"]) == list(got["lin"]) and len(got["conv"]) == 4 * 3  # c_attn, c_proj, c_fc, mlp.c_proj
    for path in got["conv"]:
        c, l = conv.get_submodule(path), lin.get_submodule(path)
        assert isinstance(c, Conv1D) and isinstance(l, nn.Linear)
        assert torch.equal(c.weight.T == 0, l.weight == 0), path
        assert (l.weight == 0).sum(1).tolist() == [l.in_features // 2] * l.out_features
        if pattern:
            assert ((l.weight == 0).reshape(l.out_features, -1, 4).sum(2) == 2).all()
    with torch.no_grad():
        torch.testing.assert_close(fwd(conv, (ids,)), fwd(lin, (ids,)), atol=1e-5, rtol=1e-5)
