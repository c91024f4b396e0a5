"""Architectures beyond the zoo's battery, each with the mechanism it once broke: an attention
that reads a parameter as a tensor (GPT-OSS's sinks), one behind a layer scale (DINOv2) or
behind window shifts and partitions (Swin), attentions that pass a position bias along (T5),
hybrid layers whose attention and state-space mixer share a cache slot (Falcon-H1), a router that
subclasses Linear but returns a tuple (Llama 4), a state-space mixer whose head maps
torch-pruning cannot apply (Mamba 2), blocks whose experts are fused weights (Mixtral), a
gated MLP whose activation is a function call (LFM2), a layer whose attributes the model's own
code reads (Whisper's first conv), a stack of layers of two classes (Jamba), one layer shared
across depths (ALBERT), norms built without a scale (Gemma 3n), layers that return tuples the
model unpacks or whose attributes it reads (Bamba, Nemotron-H), a depthwise conv on a
channels-first map inside a transformer MLP (PVT v2's Mix-FFN), a cache the model fills from
its parameters while it runs (LeViT).

Family names live here on purpose: this is test data, not the library.
"""
from __future__ import annotations

import copy

import pytest
import torch

from depthprune.depth import DepthPruner
from depthprune.errors import UserError

from archs import FFN, HEADS, HIDDEN, SEQ, VOCAB, _hf_decoder, _last_hidden, _llama_like

pytestmark = pytest.mark.unit


def _image(size=32):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _ids():
    return torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))


def _dinov2():
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS, mlp_ratio=2,
                       image_size=32, patch_size=8)
    return Dinov2Model(cfg).eval(), {"pixel_values": _image()}


def _swin():
    from transformers import SwinConfig, SwinModel
    torch.manual_seed(0)
    cfg = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    return SwinModel(cfg).eval(), {"pixel_values": _image()}


def _gpt_oss():
    arch = _hf_decoder("gpt_oss", "GptOssConfig", "self_attn",
                       **_llama_like("GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8))
    return arch.model, arch.example_inputs, arch.forward_fn


def _run(model, inputs, fwd):
    with torch.no_grad():
        return fwd(model, inputs)


@pytest.mark.parametrize("name,unit,out_proj", [
    ("gpt_oss", "model.layers.1.self_attn", "model.layers.1.self_attn.o_proj"),
    ("dinov2", "encoder.layer.1.attention", "encoder.layer.1.attention.o_proj"),
    ("swin", "encoder.layers.0.blocks.1.attention", "encoder.layers.0.blocks.1.attention.o_proj"),
])
def test_a_pruned_attention_adds_nothing_wherever_its_branch_goes(name, unit, out_proj):
    """Pruning the attention equals zeroing its output projection (the sublayer adds nothing),
    not an identity added to the residual (x + x, or x plus a shifted copy of x)."""
    if name == "gpt_oss":
        model, inputs, fwd = _gpt_oss()
    else:
        model, inputs = _dinov2() if name == "dinov2" else _swin()
        fwd = _last_hidden
    reference = copy.deepcopy(model)
    with torch.no_grad():
        proj = reference.get_submodule(out_proj)
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    dp = DepthPruner(model, inputs, fwd)
    assert any(c.unit == unit and c.candidate for c in dp.candidates(with_params=False))
    dense = _run(copy.deepcopy(model), inputs, fwd)
    dp.prune(unit)
    got = _run(model, inputs, fwd)
    assert (got - _run(reference, inputs, fwd)).abs().max() <= 1e-5
    assert (got - dense).abs().max() > 1e-3  # the attention did matter


def test_attentions_that_pass_a_position_bias_along_are_refused_by_name():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=3, num_heads=HEADS,
                   relative_attention_num_buckets=8, pad_token_id=0)
    dp = DepthPruner(T5EncoderModel(cfg).eval(), {"input_ids": _ids()}, _last_hidden)
    attention = [c for c in dp.candidates() if c.kind == "attention"]
    assert len(attention) == 3 and all(not c.candidate and "position bias" in c.reason for c in attention)
    with pytest.raises(UserError, match="position bias"):
        dp.prune(attention[1].unit)
    assert any(c.candidate for c in dp.candidates())  # the feed-forward layers still prune


def test_a_hybrid_layers_attention_and_mixer_keep_one_cache_slot():
    """Falcon-H1 layers hold an attention and a Mamba mixer under one layer index: listing used to
    run out of slots (IndexError) while renumbering them as separate layers."""
    from depthprune.adapters.hf import renumber_attention_layers
    arch = _hf_decoder("falcon_h1", "FalconH1Config", "self_attn",
                       **_llama_like("FalconH1Config", head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                     mamba_d_state=8, mamba_d_conv=4, mamba_expand=1, mamba_chunk_size=8))
    dp = DepthPruner(arch.model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe, on_change=arch.on_change)
    cands = dp.candidates()
    assert any(c.candidate for c in cands)
    dp.prune("model.layers.0.self_attn")
    renumber_attention_layers(arch.model)
    layers = arch.model.model.layers
    assert layers[1].self_attn.layer_idx == layers[1].mamba.layer_idx == 1  # layer 0 keeps its mixer
    assert layers[0].mamba.layer_idx == 0
    assert torch.isfinite(_run(arch.model, arch.example_inputs, arch.forward_fn)).all()


def test_a_linear_subclass_that_returns_a_tuple_is_not_a_layer():
    """Llama 4's router subclasses nn.Linear and returns (scores, logits): the graph used to fail
    in torch-pruning's trace (AttributeError); now the router is left out of the layers."""
    arch = _hf_decoder("llama4", "Llama4TextConfig", "self_attn",
                       **_llama_like("Llama4TextConfig", head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                                     num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8))
    dp = DepthPruner(arch.model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe, on_change=arch.on_change)
    units = dp.units()
    assert "model.layers.1.self_attn" in units and not any(u.endswith("router") for u in units)
    dp.prune("model.layers.1.self_attn")
    assert torch.isfinite(_run(arch.model, arch.example_inputs, arch.forward_fn)).all()


def test_a_unit_whose_channel_map_torch_pruning_cannot_apply_is_listed_with_the_reason():
    """Mamba 2's mixer: torch-pruning's grouped-query index map divides by zero; the unit is a
    non-candidate with the reason instead of a traceback."""
    arch = _hf_decoder("mamba2", "Mamba2Config", "mixer", vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=8,
                       head_dim=16, expand=2, n_groups=1, state_size=16, num_hidden_layers=3, chunk_size=8,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dp = DepthPruner(arch.model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe, on_change=arch.on_change)
    refused = [c for c in dp.candidates() if not c.candidate and "ZeroDivisionError" in c.reason]
    assert refused


def _skipped(module, zero_output: bool):
    """A forward hook that makes ``module`` return zeros in its output's structure
    (``zero_output``) or its hidden-states input (the module deleted)."""
    def hook(m, args, kwargs, out):
        first = out[0] if isinstance(out, tuple) else out
        value = torch.zeros_like(first) if zero_output else (args[0] if args else kwargs["hidden_states"])
        return (value, *out[1:]) if isinstance(out, tuple) else value
    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name,config,moe,extra", [
    ("mixtral", "MixtralConfig", "mlp", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2_moe", "Qwen2MoeConfig", "mlp", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=64, decoder_sparse_step=1)),
    ("gpt_oss", "GptOssConfig", "mlp", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=8)),
    ("llama4", "Llama4TextConfig", "feed_forward", dict(head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                                                        num_experts_per_tok=1, interleave_moe_layer_step=1,
                                                        attention_chunk_size=8)),
])
def test_a_mixture_of_experts_is_one_unit(name, config, moe, extra):
    """Mixtral's, Qwen2-MoE's, GPT-OSS's and Llama 4's experts are stacked 3-D weights no layer
    holds: the MoE sublayer could not be pruned at all and no block was whole. The sparse MoE
    block (router, experts, shared experts; Llama 4's returns its tokens flattened) is now one
    unit, collapsed like attention: pruning it equals the sublayer adding nothing, and pruning
    every unit of a block equals deleting the block."""
    from depthprune.importance.groups import make_groups
    arch = _hf_decoder(name, config, "self_attn", **_llama_like(config, **extra))
    model = arch.model
    reference = copy.deepcopy(model)
    dp = DepthPruner(model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe, on_change=arch.on_change)
    cands = {c.unit: c for c in dp.candidates()}
    unit = f"model.layers.1.{moe}"
    assert cands[unit].kind == "experts" and cands[unit].candidate
    assert [g.name for g in make_groups(dp, "block")] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    step = dp.prune(unit)
    sublayer = reference.get_submodule(unit)
    assert step.params_removed == sum(p.numel() for p in sublayer.parameters()) + HIDDEN
    hook = _skipped(sublayer, zero_output=True)
    out, ref = _run(model, arch.example_inputs, arch.forward_fn), _run(reference, arch.example_inputs, arch.forward_fn)
    assert (out - ref).abs().max() < 1e-5
    hook.remove()
    for u in next(g for g in make_groups(dp, "block") if g.block == 2).units:
        dp.prune(u)
    assert not any(True for _ in model.model.layers[2].parameters())
    hooks = [_skipped(sublayer, zero_output=True), _skipped(reference.model.layers[2], False)]
    ref = _run(reference, arch.example_inputs, arch.forward_fn)
    assert (_run(model, arch.example_inputs, arch.forward_fn) - ref).abs().max() < 1e-5
    for h in hooks:
        h.remove()


def test_blocks_that_keep_a_matrix_no_unit_holds_are_not_offered_as_blocks():
    """A block whose prunable units leave a weight matrix behind (one read as a tensor by the
    block's own code): pruning them all is no block removal, so no block group; ``block``
    granularity is refused naming the weight, sublayers and fine units remain."""
    from depthprune.importance.groups import make_groups

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(HIDDEN, FFN), torch.nn.Linear(FFN, HIDDEN)
            self.mix = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x))) + x @ self.mix

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.layers, self.head = torch.nn.Linear(8, HIDDEN), torch.nn.ModuleList(
                Block() for _ in range(3)), torch.nn.Linear(HIDDEN, 4)

        def forward(self, x):
            x = self.stem(x)
            for b in self.layers:
                x = b(x)
            return self.head(x)

    torch.manual_seed(0)
    dp = DepthPruner(Net().eval(), (torch.rand(2, 8),))
    with pytest.raises(UserError, match=r"no block can be removed whole.*layers\.0\.mix"):
        make_groups(dp, "block")
    mixed = make_groups(dp, "mixed")
    assert mixed and not any(g.kind == "block" for g in mixed)


def test_a_gated_mlp_with_a_functional_activation_goes_with_its_projections():
    """LFM2's MLP is ``w2(F.silu(w1(x)) * w3(x))``: with every projection pruned, the branch
    used to stay as ``silu(x) * x`` (no stand-in replaces a function call); now pruning every
    unit of the block equals deleting the block."""
    import transformers
    from transformers import AutoModelForCausalLM

    from depthprune.adapters.hf import renumber_attention_layers, wrap
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(**_llama_like("Lfm2Config", layer_types=["full_attention", "conv", "full_attention"]))
    lm = wrap(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), "zoo:lfm2", seq_len=SEQ)
    deleted = copy.deepcopy(lm.model)
    deleted.model.layers[0].forward = lambda hidden_states, *a, **k: hidden_states
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=renumber_attention_layers)
    units = sorted(u for u in dp.units() if u.startswith("model.layers.0."))
    assert units == ["model.layers.0.feed_forward.w1", "model.layers.0.feed_forward.w2", "model.layers.0.feed_forward.w3",
                     "model.layers.0.self_attn"]
    for u in units:
        if dp.g.nodes[u]["state"] == "live":
            dp.prune(u)
    got, want = (_run(m, lm.example_inputs, lm.forward_fn) for m in (lm.model, deleted))
    assert (got - want).abs().max() <= 1e-5


def test_a_layer_the_models_code_reads_attributes_of_keeps_them():
    """Whisper's encoder reads ``conv1.stride``: its promise used to pass (no run was needed) and
    the prune then failed; then listing ran the model and made it a non-candidate. A stand-in
    now keeps the replaced module's plain attributes: conv1 (stride 1) prunes, and every unit
    listed prunes as promised."""
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=1, encoder_attention_heads=HEADS,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, num_mel_bins=8,
                        max_source_positions=8, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    x = torch.rand(1, 8, 16, generator=torch.Generator().manual_seed(0))
    dp = DepthPruner(WhisperModel(cfg).get_encoder().eval(), {"input_features": x}, _last_hidden)
    cands = {c.unit: c for c in dp.candidates()}
    assert cands["conv1"].candidate
    for c in cands.values():  # every unit listed prunes
        if c.candidate:
            trial = copy.deepcopy(dp)
            assert trial.prune(c.unit).params_removed == c.params_removed
    dense = _run(dp.model, {"input_features": x}, _last_hidden).shape
    dp.prune("conv1")
    assert dp.model.conv1.stride == (1,) and _run(dp.model, {"input_features": x}, _last_hidden).shape == dense


def test_a_hybrid_stack_of_two_layer_classes_is_the_models_blocks():
    """Jamba's layers are Mamba and attention decoder layers in one ModuleList: it used to be
    refused ("no repeated blocks"); now they are its blocks, the default selection with
    compensation prunes it, and cached decoding equals uncached after an attention is pruned."""
    from depthprune.adapters.hf import wrap
    from depthprune.blocks import find_blocks
    from depthprune.eval import calibration_batches
    from depthprune.importance import PruneConfig, prune_to_target
    arch = _hf_decoder("jamba", "JambaConfig", "mamba",
                       **_llama_like("JambaConfig", num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
                                     expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                                     mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8))
    model = arch.model
    assert [p for p, _ in find_blocks(model)] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    lm = wrap(model, "zoo:jamba", seq_len=SEQ)
    batches = calibration_batches(torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1)), 2)
    config = PruneConfig(0.2, score="ce", schedule="shared-iterative", granularity="mixed", rescore_top=4, compensate=True)
    _, out = prune_to_target(lm, config, batches, progress=False)
    assert out.reached and out.params_after <= 0.8 * out.params_before and out.compensation
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_a_layer_shared_across_depths_is_no_candidate():
    """ALBERT calls one layer at every depth: the graph failed to build (call paths ``0@2``);
    now it builds and the shared units are non-candidates with the reason."""
    from transformers import AlbertConfig, AlbertModel
    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                       intermediate_size=FFN, max_position_embeddings=64, embedding_size=32)
    dp = DepthPruner(AlbertModel(cfg).eval(), {"input_ids": _ids()}, _last_hidden)
    shared = [c for c in dp.candidates() if "albert_layers" in c.unit and "inside attention" not in c.reason]
    assert shared and all(not c.candidate and "called 3 times" in c.reason for c in shared)


def test_norms_without_a_scale_and_layers_the_model_reads_prune_with_the_default_selection():
    """Gemma 3n builds some RMSNorms without a weight (the graph failed: no attribute 'weight');
    Bamba's model unpacks two values from every layer (block caching returned one); Nemotron-H
    reads each layer's ``block_type`` (the caching stand-in had none) and its norms' weights (a
    trial that pruned a norm crashed the scoring; it is now a unit that cannot be pruned)."""
    from depthprune.adapters.hf import wrap
    from depthprune.eval import calibration_batches
    from depthprune.importance import PruneConfig, prune_to_target
    builds = {
        "gemma3n": ("Gemma3nTextConfig", "self_attn", dict(
            head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB, laurel_rank=8, altup_num_inputs=2,
            num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0, 0.0], intermediate_size=[FFN] * 3)),
        "bamba": ("BambaConfig", "self_attn", dict(
            attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
            mamba_chunk_size=8, mamba_expand=2, mamba_d_conv=4)),
        "nemotron_h": ("NemotronHConfig", "mixer", dict(
            hybrid_override_pattern="M*-", mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
            chunk_size=8, expand=2, conv_kernel=4, head_dim=16)),
    }
    for name, (config, attention, extra) in builds.items():
        import transformers
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        cfg = getattr(transformers, config)(**{**_llama_like(config), **extra})
        lm = wrap(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), f"zoo:{name}", seq_len=SEQ)
        batches = calibration_batches(torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1)), 2)
        config = PruneConfig(0.15, score="ce", schedule="shared-iterative", granularity="mixed", rescore_top=4,
                             compensate=True)
        _, out = prune_to_target(lm, config, batches, progress=False)
        assert out.applied, name
        assert torch.isfinite(_run(lm.model, lm.example_inputs, lm.forward_fn)).all(), name


def test_a_width_a_fixed_size_parameter_needs_keeps_its_layers_in_every_block():
    """ConvNeXt V2's GRN scales its input by a parameter of the expanded width: replacing a
    pointwise conv breaks the model. Listing ran the first block's promise and then promised the
    same step in every other block without its result; a schedule's trial crashed the scoring.
    Both now see that no pointwise conv can go, and the schedule prunes what can."""
    from transformers import ConvNextV2Config, ConvNextV2Model
    from depthprune.importance.groups import make_groups
    from depthprune.importance.schedules import Paper
    from depthprune.importance.scores import AngularScorer
    torch.manual_seed(0)
    model = ConvNextV2Model(ConvNextV2Config(num_channels=3, hidden_sizes=[16, 32], depths=[2, 2], num_stages=2,
                                             image_size=32)).eval()
    inputs = {"pixel_values": _image()}
    dp = DepthPruner(model, inputs, _last_hidden)
    pointwise = [c for c in dp.candidates() if ".pwconv" in c.unit]
    assert len(pointwise) == 8 and not any(c.candidate for c in pointwise)
    assert sum("does not run" in c.reason for c in pointwise) == 6  # the last stage's pwconv2 writes the output
    scorer = AngularScorer(model, [inputs], _last_hidden, progress=False)
    out = Paper().run(dp, scorer, make_groups(dp, "fine"), 0.3, progress=False)
    assert out.applied and not any(".pwconv" in a["unit"] for a in out.applied)
    assert torch.isfinite(_run(model, inputs, _last_hidden)).all()


def test_a_model_that_writes_its_own_weights_is_refused_and_context_names_are_read():
    """RWKV divides some weights in place on its first forward in eval mode (and multiplies them
    back in training mode): a pruned copy was saved in the divided state, divided again when
    loaded, and crashed there on a pruned layer's missing weight. Tracing now refuses such a
    model by name of the weights; with the rescaling off it prunes. MPT names its context
    ``max_seq_len`` and RWKV ``context_length``: evaluation windows are bounded by them."""
    from transformers import AutoModelForCausalLM, MptConfig, RwkvConfig
    from depthprune.adapters import context_length
    from depthprune.adapters.hf import wrap
    for rescale in (6, 0):
        torch.manual_seed(0)
        cfg = RwkvConfig(vocab_size=VOCAB, context_length=48, hidden_size=HIDDEN, num_hidden_layers=2,
                         attention_hidden_size=HIDDEN, intermediate_size=FFN, rescale_every=rescale)
        lm = wrap(AutoModelForCausalLM.from_config(cfg).eval(), "zoo:rwkv", seq_len=SEQ)
        assert context_length(lm) == 48
        if rescale:
            with pytest.raises(UserError, match=r"writes its own weights in place \(rwkv\.blocks\.0\.attention\.output"):
                DepthPruner(lm.model, lm.example_inputs, lm.forward_fn)
        else:
            dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn)
            assert dp.prune("rwkv.blocks.1.feed_forward.key").params_removed > 0
    mpt = MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_heads=HEADS, n_layers=2, expansion_ratio=2, max_seq_len=40)
    assert context_length(wrap(AutoModelForCausalLM.from_config(mpt).eval(), "zoo:mpt", seq_len=SEQ)) == 40


def test_a_model_whose_own_forward_fails_is_one_error_not_a_traceback():
    """A Hugging Face model whose forward fails on its example inputs without depthprune (DBRX
    without ``clip_qkv`` in one transformers release) is refused in one line; a failure only the
    trace causes stays a traceback (a depthprune bug to see)."""
    from depthprune.adapters.hf import random_llama, wrap
    from depthprune.cli import traced
    lm = wrap(random_llama(2), "zoo:llama")

    def fails(*_):
        raise RuntimeError("the model's own bug")
    hook = lm.model.model.layers[1].mlp.register_forward_pre_hook(fails)
    with pytest.raises(UserError, match="running zoo:llama on its example inputs failed: RuntimeError: the model's own"):
        traced(lm, lambda: DepthPruner(lm.model, lm.example_inputs, lm.forward_fn))
    hook.remove()

    def trace_only():
        raise RuntimeError("a trace bug")
    with pytest.raises(RuntimeError, match="a trace bug"):
        traced(lm, trace_only)


class _TorchEncoder(torch.nn.Module):
    def __init__(self, norm_first: bool, activation: str):
        super().__init__()
        self.emb = torch.nn.Linear(8, HIDDEN)
        layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, batch_first=True,
                                                 norm_first=norm_first, activation=activation)
        self.enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = torch.nn.Linear(HIDDEN, 5)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_pytorchs_own_transformer_encoder_prunes_exactly(norm_first, activation):
    """``nn.TransformerEncoder(Layer)``: the encoder reads ``self_attn.batch_first`` of its first
    layer and, in inference, a fused kernel reads every sublayer's weights, so no unit could be
    pruned. Stand-ins now keep the replaced module's plain attributes, and the fast path is
    turned off once a layer holds one. Pruning the attention equals zeroing its output; pruning
    both feed-forward transforms equals zeroing the feed-forward output (post-norm too: the
    ``x + act(x)`` left in the residual is patched)."""
    from depthprune.depth.identity import make_stand_in
    torch.manual_seed(0)
    model = _TorchEncoder(norm_first, activation).eval()
    reference = copy.deepcopy(model)
    x = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(0))
    try:
        dp = DepthPruner(model, (x,))
        with pytest.warns(UserWarning, match="fast path off"):  # the listing's trial prunes turn it off
            cands = {c.unit: c for c in dp.candidates()}
        assert not torch.backends.mha.get_fastpath_enabled()
        assert all(cands[f"enc.layers.{i}.{u}"].candidate for i in range(3) for u in ("self_attn", "linear1", "linear2"))
        dp.prune("enc.layers.0.self_attn")
        dp.prune("enc.layers.2.linear1")
        dp.prune("enc.layers.2.linear2")
        stand_in = model.enc.layers[0].self_attn
        assert stand_in.batch_first and make_stand_in(stand_in.spec()).batch_first
        reference.enc.layers[0].self_attn.register_forward_hook(lambda m, i, o: (torch.zeros_like(o[0]),) + o[1:])
        reference.enc.layers[2].linear2.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        assert torch.equal(_run(model, (x,), lambda m, i: m(*i)), _run(reference, (x,), lambda m, i: m(*i)))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class _MixFFN(torch.nn.Module):
    """PVT v2's / SegFormer's feed-forward: tokens to a channels-first map for a depthwise conv
    inside a channels-last transformer MLP, and back."""

    def __init__(self, d: int = 16, h: int = 32, side: int = 4):
        super().__init__()
        self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.dw = torch.nn.Conv2d(h, h, 3, padding=1, groups=h)
        self.side = side

    def forward(self, x):
        y = self.fc1(self.norm(x))
        b, n, c = y.shape
        y = self.dw(y.transpose(1, 2).reshape(b, c, self.side, self.side)).flatten(2).transpose(1, 2)
        return x + self.fc2(torch.nn.functional.gelu(y))  # a non-contiguous input


def test_a_channels_first_map_inside_a_channels_last_mlp_keeps_its_channels():
    """``(B, C, H, W) -> (B, C, H*W)`` in a model whose tensors are ``(B, tokens, C)`` was read with
    the channels last and taken for a channel mix, so neither projection of the MLP could go. A
    reading other than the model's convention is taken where a neighbouring layer's width pins
    the channels to it. ``fc2`` reads its tokens transposed (non-contiguous), where ``F.linear``
    runs a product, a view and a separate bias add that DepGraph took for the layer (its input
    channels met its output's): the trace gives linear layers contiguous inputs. Pruning ``fc1`` then equals the MLP with ``fc1`` and the norm only it read
    (FindNorm) identities and the kept channels of the conv and ``fc2``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), _MixFFN(), _MixFFN(), torch.nn.Linear(16, 5)).eval()
    x = torch.randn(1, 16, 8)
    fwd = lambda m, i: m(i)  # noqa: E731
    dp = DepthPruner(model, x, fwd)
    cands = {c.unit: c for c in dp.candidates()}
    assert cands["1.fc1"].candidate and cands["1.fc2"].candidate, (cands["1.fc1"].reason, cands["1.fc2"].reason)
    ffn = copy.deepcopy(model[1])
    before = sum(p.numel() for p in model.parameters())
    dp.prune("1.fc1")
    assert before - sum(p.numel() for p in model.parameters()) == cands["1.fc1"].params_removed
    # which 16 of the 32 hidden channels stayed: the conv's kept filters are rows of the old ones
    kept = [int((ffn.dw.weight - w).flatten(1).abs().sum(1).argmin()) for w in model[1].dw.weight]
    assert len(set(kept)) == 16
    h = model[0](x)
    y = torch.nn.functional.conv2d(h.transpose(1, 2).reshape(1, 16, 4, 4), ffn.dw.weight[kept], ffn.dw.bias[kept],
                                   padding=1, groups=16).flatten(2).transpose(1, 2)
    expected = h + torch.nn.functional.linear(torch.nn.functional.gelu(y), ffn.fc2.weight[:, kept],
                                                        ffn.fc2.bias)
    with torch.no_grad():
        assert isinstance(model[1].norm, type(model[1].fc1))
        assert torch.allclose(model[1](h), expected, atol=1e-6)


class _CachedBias(torch.nn.Module):
    """LeViT's attention-bias cache: a tensor computed from a parameter in eval, kept on the
    module (a dict keyed by device) and a plain attribute."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.bias = torch.nn.Parameter(torch.randn(d))
        self.cache: dict = {}
        self.last = None

    def forward(self, x):
        if not self.training and str(x.device) not in self.cache:  # filled once
            self.cache[str(x.device)] = self.bias * 2
            self.last = self.bias + 1
        return x + self.fc2(torch.relu(self.fc1(x))) + self.cache[str(x.device)]


def test_a_trace_leaves_no_autograd_graph_in_what_the_model_keeps():
    """The dependency trace runs the model with gradients: tensors its code keeps on its modules
    held the trace's autograd graph, and ``copy.deepcopy`` of the model then failed (LeViT,
    EfficientFormer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_CachedBias(), _CachedBias()).eval()
    x = torch.randn(2, 16)
    dp = DepthPruner(model, x, lambda m, i: m(i))
    assert model[0].cache["cpu"].grad_fn is None and model[0].last.grad_fn is None
    dp.prune("0.fc1")
    copy.deepcopy(model)
