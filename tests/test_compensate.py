"""Training-free compensation: exact where the removal is exactly linear, never worse on the
calibration set, invisible when nothing is pruned."""
import copy

import pytest
import torch
import torch.nn as nn

from depthprune.compensate import Compensator, RefitStats, refit, residual
from depthprune.blocks import find_blocks
from depthprune.depth import DepthPruner

from archs import DECODERS, ENCODERS, SEQ, VOCAB

pytestmark = pytest.mark.unit


def test_refit_recovers_an_exact_linear_target_and_keeps_a_useless_one():
    g = torch.Generator().manual_seed(0)
    W_true, W0 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    stats = RefitStats(7, 5)
    for k in range(6):
        z = torch.randn(40, 7, generator=g)
        stats.add(z, z @ W_true.T, k)
    new, info = refit(stats, W0)
    assert info["alpha"] == 0.0 and torch.allclose(new, W_true.double(), atol=1e-6)
    assert residual(new, *stats.total()) < 1e-8 < info["fit_before"]
    # targets that no linear map of z predicts: held-out error says keep the weight
    noise = RefitStats(7, 5)
    for k in range(4):
        noise.add(torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g) * 100, k)
    kept, info = refit(noise, W0)
    assert kept is None and info["alpha"] is None


class ToyBlock(nn.Module):
    """The block's second sublayer ``v`` is linear in the first one's output, which is its whole
    stream (no skip before it): removing ``v`` is exactly compensable in ``w``."""

    def __init__(self, d):
        super().__init__()
        self.u, self.w, self.v = nn.Linear(d, 2 * d), nn.Linear(2 * d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        h = self.w(torch.relu(self.u(x)))
        return h + self.v(h)


class PostLNBlock(nn.Module):
    """A sublayer whose output is layer-normalised (a centring norm with gain and shift) before
    the residual add."""

    def __init__(self, d):
        super().__init__()
        self.u, self.w, self.norm = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.LayerNorm(d)
        with torch.no_grad():
            self.w.weight.mul_(30)  # outputs far above the norm's eps, as in trained models
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x):
        return x + self.norm(self.w(torch.relu(self.u(x))))


class Toy(nn.Module):
    def __init__(self, d=4, n=3, block=ToyBlock):
        super().__init__()
        self.blocks = nn.ModuleList([block(d) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _toy():
    torch.manual_seed(0)
    m = Toy()
    batches = [(torch.randn(4, 16, 4),) for _ in range(2)]
    return m, batches


def test_compensating_an_exactly_linear_removal_recovers_the_dense_output():
    m, batches = _toy()
    dense = copy.deepcopy(m)
    comp = Compensator(m, batches, lambda mod, inp: mod(*inp))
    dp = DepthPruner(m, (torch.randn(1, 5, 4),))
    dp.prune("blocks.1.v")
    x = torch.randn(3, 7, 4)
    assert (m(x) - dense(x)).abs().max() > 1e-3  # pruning changed the output ...
    rec = comp.compensate(["blocks.1.v"])
    assert rec["writer"] == "blocks.1.w" and rec["alpha"] == 0.0
    assert (m(x) - dense(x)).abs().max() <= 1e-5  # ... and the refit puts it back exactly


def test_a_writer_behind_a_centring_norm_is_refit_for_the_norms_output():
    """The norm ignores its input's scale and mean: the refit matches each token's direction
    (scales found with it), so a changed writer (weight and bias) gives the dense output back."""
    torch.manual_seed(0)
    m = Toy(d=8, block=PostLNBlock)
    batches = [(torch.randn(4, 16, 8),) for _ in range(4)]
    comp = Compensator(m, batches, lambda mod, inp: mod(*inp))
    block, path, w, norm = comp.find_writer(1)
    assert (block, path, norm.path, norm.centred) == (1, "blocks.1.w", "blocks.1.norm", True)
    assert torch.allclose(norm.gain.float(), m.blocks[1].norm.weight) and torch.allclose(norm.shift.float(), m.blocks[1].norm.bias)
    dense = copy.deepcopy(m)
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        w.weight.add_(torch.randn(w.weight.shape) * w.weight.std())
        w.bias.add_(3.0)
        assert (m(x) - dense(x)).abs().max() > 0.1
        with comp.what_if([path]):
            assert (m(x) - dense(x)).abs().max() <= 1e-4
    rec = comp.compensate([path])
    assert rec["through"] == "blocks.1.norm" and rec["writer"] == path
    with torch.no_grad():
        assert (m(x) - dense(x)).abs().max() <= 1e-4


def test_no_prune_means_no_refit_and_bit_identical_outputs():
    m, batches = _toy()
    dense = copy.deepcopy(m)
    comp = Compensator(m, batches, lambda mod, inp: mod(*inp))
    assert comp.compensate([]) is None
    x = torch.randn(2, 5, 4)
    assert torch.equal(m(x), dense(x))


#: Decoders whose sublayers pass through a norm before the residual add (post-sublayer norms):
#: the writer is refit through it, for the norm's output.
POST_NORM = {"gemma2", "gemma3", "olmo2"}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_a_changed_writer_is_refit_exactly_on_every_decoder_of_the_zoo(name):
    """Across the decoder zoo (transposed Conv1D writers, tokens flattened before the MLP, parallel
    residuals, scaled branches, norms between the writer and the residual add): a change of
    block 1's residual writer is exactly linear in its input, and the refit puts the dense
    logits back."""
    from depthprune.adapters.hf import wrap
    from depthprune.eval import calibration_batches
    lm = wrap(DECODERS[name]().model, f"zoo:{name}", seq_len=SEQ)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (32, 24), generator=g)  # 768 tokens: more than any writer's input width
    batches = calibration_batches(ids, 8)
    if name in POST_NORM:
        # at this tiny random init the writers' outputs are so small (RMS ~3e-3) that the norm's
        # eps changes its output with its input's scale; trained models write far above it
        with torch.no_grad():
            for _, block in find_blocks(lm.model):
                block.mlp.down_proj.weight.mul_(1000)
    comp = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn)
    block, path, m, norm = comp.find_writer(1)
    assert block == 1
    assert (norm is not None) == (name in POST_NORM)
    if norm is not None:
        assert path.endswith("mlp.down_proj") and norm.path.endswith("post_feedforward_layernorm")
    dense = copy.deepcopy(lm.model)
    with torch.no_grad():
        m.weight.add_(3 * m.weight.std() * torch.randn(m.weight.shape, generator=g))
        ref, pruned = (lm.logits_fn(x, (ids,)) for x in (dense, lm.model))
    assert (pruned - ref).abs().max() > 1e-2  # the change moved the logits ...
    with comp.what_if([path]) as first, torch.no_grad():  # the refit, without the calibration-loss guard
        assert first == 1  # (a random model may score lower with the changed weight)
        assert (lm.logits_fn(lm.model, (ids,)) - ref).abs().max() <= 1e-4  # ... and the refit puts them back
    with torch.no_grad():
        assert torch.equal(lm.logits_fn(lm.model, (ids,)), pruned)  # undone after the trial


@pytest.mark.parametrize("name,writer,norm", [("bert", "encoder.layer.1.output.dense", "encoder.layer.1.output.LayerNorm"),
                                               ("vit", "layers.1.mlp.fc2", None)])
def test_a_changed_writer_is_refit_exactly_on_the_encoders_of_the_zoo(name, writer, norm):
    """BERT normalises after the residual add (the norm's input holds the writer's output and the
    residual): the writer is refit through it; ViT's pre-norm writer directly."""
    arch = ENCODERS[name]()
    g = torch.Generator().manual_seed(3)
    key, x = next(iter(arch.example_inputs.items()))
    batches = [{key: torch.randint(0, VOCAB, (8, SEQ), generator=g) if name == "bert"
                else torch.rand(8, *x.shape[1:], generator=g)} for _ in range(4)]  # 512 tokens
    comp = Compensator(arch.model, batches, arch.forward_fn)
    found = comp.find_writer(1)
    assert (found.block, found.path, found.norm and found.norm.path) == (1, writer, norm)
    dense = copy.deepcopy(arch.model)
    with torch.no_grad():
        found.module.weight.add_(3 * found.module.weight.std() * torch.randn(found.module.weight.shape, generator=g))
        ref = [arch.forward_fn(dense, b) for b in batches]
        assert max((arch.forward_fn(arch.model, b) - r).abs().max() for b, r in zip(batches, ref)) > 0.1
        with comp.what_if([writer]):
            assert max((arch.forward_fn(arch.model, b) - r).abs().max() for b, r in zip(batches, ref)) <= 1e-4


def _llama_calib(layers=4):
    from depthprune.adapters.load import load_model
    from depthprune.eval import calibration_batches
    lm = load_model(f"random-llama:{layers}")
    g = torch.Generator().manual_seed(3)
    return lm, calibration_batches(torch.randint(0, 128, (6, 24), generator=g), 2)


def _calib_loss(lm, batches) -> float:
    with torch.no_grad():
        total = [lm.nll_fn(lm.logits_fn(lm.model, b), b) for b in batches]
    return sum(float(n) for n, _ in total) / sum(c for _, c in total)


def test_compensation_never_increases_the_calibration_loss():
    lm, batches = _llama_calib()
    comp = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    refits = 0
    for u in ("model.layers.1.self_attn", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.down_proj",
              "model.layers.0.mlp.up_proj", "model.layers.2.self_attn", "model.layers.2.mlp.up_proj"):
        dp.prune(u)
        before = _calib_loss(lm, batches)
        rec = comp.compensate([u])
        after = _calib_loss(lm, batches)
        assert after <= before + 1e-9, (u, rec)
        refits += rec.get("alpha") is not None
        if rec.get("calib_loss_before") is not None:  # the guard measured what this test measures
            assert rec["calib_loss_before"] == pytest.approx(before, rel=1e-9)
    assert refits >= 2  # compensation did something, and never made things worse


def test_a_compensated_model_saves_reloads_and_exports_like_any_other(tmp_path):
    from depthprune.depth.plan import fingerprint
    from depthprune.export import export
    from depthprune.io.model_dir import load_pruned, save_pruned
    from transformers import AutoModelForCausalLM
    lm, batches = _llama_calib()
    fp = fingerprint(lm.model)
    comp = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    units = ["model.layers.2.self_attn", *[f"model.layers.1.{u}" for u in ("self_attn", "mlp.gate_proj",
                                                                          "mlp.up_proj", "mlp.down_proj")]]
    for u in units:
        dp.prune(u)
        comp.compensate([u])
    assert any(r.get("alpha") is not None for r in comp.log)
    out = save_pruned(dp, tmp_path / "out", "random-llama:4", fp, lm=lm)
    lm2, _ = load_pruned(out)
    ids = lm.example_inputs[0]
    with torch.no_grad():
        ref = lm.model(input_ids=ids, use_cache=False).logits
        assert torch.equal(lm2.model(input_ids=ids, use_cache=False).logits, ref)
        export(out, "nemotron-nas", tmp_path / "nas")
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "nas", trust_remote_code=True)
        assert (m(input_ids=ids, use_cache=False).logits - ref).abs().max() <= 1e-5


def test_block_influence_and_last_token_distances_are_the_published_ones():
    import torch.nn.functional as F
    from depthprune.blocks import find_blocks
    from depthprune.importance import AngularScorer, make_groups
    lm, batches = _llama_calib()
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    groups = make_groups(dp, "block")
    ins, outs = {}, {}
    def record(b):
        def hook(mod, args, kwargs, out):
            ins.setdefault(b, []).append(args[0] if args else kwargs["hidden_states"])
            outs.setdefault(b, []).append(out[0] if isinstance(out, tuple) else out)
        return hook

    hooks = [m.register_forward_hook(record(b), with_kwargs=True) for b, (_, m) in enumerate(find_blocks(lm.model))]
    with torch.no_grad():
        for b in batches:
            lm.forward_fn(lm.model, b)
    for h in hooks:
        h.remove()
    bi = AngularScorer(lm.model, batches, lm.forward_fn, False, distance="bi").score(dp, groups)
    last = AngularScorer(lm.model, batches, lm.forward_fn, False, distance="angular-last").score(dp, groups)
    for g in groups:
        a, o = torch.cat(ins[g.block]).double(), torch.cat(outs[g.block]).double()
        cos = F.cosine_similarity(a, o, dim=-1)
        assert bi[g.name] == pytest.approx(float((1 - cos).mean()), rel=1e-9)  # ShortGPT's block influence
        assert last[g.name] == pytest.approx(float(torch.arccos(cos[:, -1].clamp(-1, 1)).mean() / torch.pi), rel=1e-9)


def test_a_compensated_score_is_the_score_after_the_real_prune_and_refit_and_leaves_nothing_behind():
    """In-sample (``cross_fit`` off, the default): the CE after really pruning and refitting.
    Cross-fitted: each sample scored with the refit fit on the other fold only."""
    import torch.nn.functional as F
    from depthprune.compensate import fold_fits
    from depthprune.importance import CrossEntropyScorer, Group, make_groups
    from depthprune.importance.scores import changed_paths
    lm, batches = _llama_calib()
    comp = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    scorer = CrossEntropyScorer(lm.model, batches, lm.logits_fn, progress=False)
    first = Group("model.layers.1.mlp.gate_proj", ["model.layers.1.mlp.gate_proj"], block=1)
    dp.prune(first.name)
    comp.compensate(first.units)
    scorer.committed(dp, first)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    outputs = [[h.clone() for h in hs] for hs in comp.states.outputs]
    whole = [g for g in make_groups(dp, "block") if g.block == 3]  # a whole block: the writer is block 2's
    groups = [Group(u, [u], block=b) for u, b in (("model.layers.2.self_attn", 2), ("model.layers.3.mlp.up_proj", 3))]
    groups += whole
    plain = scorer.score(dp, groups)
    assert comp.cross_fit is False
    got = scorer.score_compensated(dp, groups, comp)
    comp.cross_fit = True
    crossed = scorer.score_compensated(dp, groups, comp)
    # nothing left behind: weights, the compensator's states, the plain scores
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(a, b) for hs, hs2 in zip(outputs, comp.states.outputs) for a, b in zip(hs, hs2))
    assert scorer.score(dp, groups) == plain
    assert got["model.layers.3.mlp.up_proj"] < 0.01 * plain["model.layers.3.mlp.up_proj"]  # the refit is worth
    assert got["model.layers.2.self_attn"] < plain["model.layers.2.self_attn"]  # something where it is made
    refits = 0
    for g in groups:  # the same numbers from the real thing: prune, refit without the guard, measure
        c2 = copy.deepcopy(comp)
        dp2 = DepthPruner(c2.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
        first, t = c2._blocks_changed(changed_paths([dp2.prune(u) for u in g.units]))
        c2.states.refresh(first)
        fit = c2._fit(t)
        assert (fit.block < t) == (g.kind == "block")  # a whole block's refit is in the block before it
        s2 = CrossEntropyScorer(c2.model, batches, lm.logits_fn, progress=False, cache=False)
        s2.dense = scorer.dense
        if fit.new is not None:
            old = c2._swap(fit.module, fit.new)
        assert got[g.name] == pytest.approx(s2.value() - scorer.baseline, rel=1e-6, abs=1e-9), g.name
        if fit.new is None:  # cross-validation keeps the weight: nothing to cross-fit
            assert crossed[g.name] == got[g.name]
            continue
        c2._unswap(fit.module, old)
        refits += 1
        ce, n = 0.0, 0
        for k, f in enumerate(fold_fits(fit.stats, fit.old, fit.info["alpha"])):  # cross-fitted, by hand
            c2._swap(fit.module, f.float())
            j = 0
            for b, ref in zip(batches, scorer.dense):
                with torch.no_grad():
                    logp = F.log_softmax(lm.logits_fn(c2.model, b).float(), -1)
                for s in range(logp.shape[0]):
                    if j % 2 == k:
                        ce -= float((ref[s].float() * logp[s]).sum())
                        n += logp.shape[1]
                    j += 1
        assert crossed[g.name] == pytest.approx(ce / n - scorer.baseline, abs=1e-6), g.name  # float32 sums of ~4.9
        assert crossed[g.name] > got[g.name]  # fit and measured on other tokens: less optimistic
    assert refits == 2


def test_removing_the_block_before_a_removed_run_refits_for_the_end_of_the_run():
    """Block 2 removed (refit in block 1), then block 1: the refit moves to block 0 and matches
    the dense output of block 2, not of block 1 (which would undo the run's compensation): the
    same refit, from the same statistics, as removing blocks 1-2 together (ReplaceMe's choice).
    No calibration-loss guard here (no ``logits_fn``): random weights, the refit is only checked
    for being the same one."""
    from depthprune.adapters.load import load_model
    from depthprune.eval import calibration_batches
    from depthprune.importance import make_groups
    from depthprune.importance.scores import changed_paths

    def pruned(order):
        lm = load_model("random-llama:5")
        batches = calibration_batches(torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(3)), 2)
        comp = Compensator(lm.model, batches, lm.forward_fn)
        dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
        blocks = {g.block: g.units for g in make_groups(dp, "block")}
        recs = [comp.compensate(changed_paths([dp.prune(u) for b in step for u in blocks[b]])) for step in order]
        with torch.no_grad():
            return recs, lm.model(input_ids=lm.example_inputs[0], use_cache=False).logits

    seq, one_by_one = pruned([[2], [1]])
    joint, together = pruned([[1, 2]])
    alone, _ = pruned([[1]])
    assert [(r["block"], r["writer_block"]) for r in seq] == [(2, 1), (2, 0)]
    assert (joint[0]["block"], joint[0]["writer_block"]) == (2, 0)
    assert joint[0]["alpha"] is not None
    for k in ("alpha", "tokens", "heldout_before", "heldout_after", "fit_before", "fit_after"):
        assert seq[1][k] == pytest.approx(joint[0][k], rel=1e-9), k
    assert alone[0]["heldout_before"] != pytest.approx(joint[0]["heldout_before"], rel=1e-3)  # another target
    assert torch.allclose(one_by_one, together, atol=1e-5, rtol=0)
