"""Exports read back by their target readers: equal logits (fp32, max |delta| <= 1e-5), equal greedy
tokens, exact refusals, and the CLI's bad-input contract."""
import copy
import importlib
import json
import os

import pytest
import torch
import torch.nn as nn

from depthprune.adapters.hf import random_llama, renumber_attention_layers, wrap
from depthprune.depth import DepthPruner, count_params
from depthprune.errors import UserError
from depthprune.export import export
from depthprune.export.nemotron_nas import ffn_mult_for, ffn_width, padded_width
import cli_run

BLOCK = ["self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
MLP = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def pruned_llama(layers, units, narrow=None, **overrides):
    """A random Llama with ``units`` pruned; ``narrow``: {block: width} MLPs narrowed by a width op."""
    lm = wrap(random_llama(layers, **overrides), f"random-llama:{layers}")
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=renumber_attention_layers)
    for u in units:
        dp.prune(u)
    for b, width in (narrow or {}).items():
        n = lm.model.model.layers[b].mlp.gate_proj.out_features
        idxs = list(range(width, n))
        dp.apply({"op": "width", "unit": f"narrow {b}", "items": [
            [f"model.layers.{b}.mlp.gate_proj", "out", idxs], [f"model.layers.{b}.mlp.up_proj", "out", idxs],
            [f"model.layers.{b}.mlp.down_proj", "in", idxs]]})
    lm.model.config.use_cache = True
    return lm, dp


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def greedy(model, ids, **kw):
    model.generation_config.pad_token_id = 0
    return model.generate(ids, max_new_tokens=12, do_sample=False, **kw)


def assert_same_model(lm, exported):
    """Equal logits on the example input and equal greedy tokens (with the KV cache)."""
    ids = lm.example_inputs[0]
    delta = (logits(lm.model, ids, use_cache=False) - logits(exported, ids)).abs().max()
    assert delta <= 1e-5, delta
    assert torch.equal(greedy(lm.model, ids[:, :6]), greedy(exported, ids[:, :6]))


# ---------------------------------------------------------------- hf
@pytest.mark.unit
def test_hf_whole_blocks_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM
    units = [f"model.layers.1.{u}" for u in BLOCK] + [f"model.layers.3.{u}" for u in reversed(BLOCK)]
    lm, _ = pruned_llama(4, units, tie_word_embeddings=True)
    result = export(lm, "hf", tmp_path / "hf")
    assert not result.extra_params
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_params(model) == count_params(lm.model) == result.params
    assert_same_model(lm, model)
    # layers renumbered: exported layer 1 is the pruned model's layer 2
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, lm.model.model.layers[2].mlp.up_proj.weight)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["gpt2", "opt", "falcon", "gpt_neox_parallel", "bloom", "phi", "gemma2", "gemma3"])
def test_hf_whole_blocks_round_trip_beyond_llama(tmp_path, name):
    """Any decoder stack: block 1 pruned unit by unit exports as a plain checkpoint of its own
    class with one layer fewer, equal logits and equal greedy tokens with the KV cache."""
    from archs import DECODERS
    from transformers import AutoModelForCausalLM
    from depthprune.adapters.hf import wrap
    from depthprune.importance import make_groups
    lm = wrap(DECODERS[name]().model, f"zoo:{name}")
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    for u in next(g for g in make_groups(dp, "block") if g.block == 1).units:
        dp.prune(u)
    lm.model.config.use_cache = True
    result = export(lm, "hf", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(model) is type(lm.model) and model.config.num_hidden_layers == 2
    assert count_params(model) == count_params(lm.model) == result.params
    assert_same_model(lm, model)


@pytest.mark.unit
@pytest.mark.parametrize("name,units", [("gemma2", "model.layers.0.self_attn"), ("gemma2", "model.layers.1.self_attn"),
                                        ("gemma2", "model.layers.0.self_attn,model.layers.2.self_attn"),
                                        ("gemma3", "model.layers.0.self_attn"), ("llama", "model.layers.0.self_attn")])
def test_kv_cache_generation_after_an_attention_is_pruned(tmp_path, name, units):
    """Gemma 2 gives layers sliding or full attention (``layer_types``, read by position for the
    masks and by cache slot for the cache); Gemma 3's decoder layers carry their attention's
    index too. With attentions pruned, greedy decoding with the KV cache equals greedy decoding
    without it, and a cached step's logits equal the full forward's, in memory and after the
    depthprune export. With every sliding attention pruned (Gemma 2, layers 0 and 2) the cache's
    slot 0, where it reads the sequence length, used to stay empty (cached positions restarted at 0)."""
    from archs import DECODERS
    from transformers import AutoModelForCausalLM
    lm = wrap(DECODERS[name]().model, f"zoo:{name}")
    dense_types = copy.deepcopy(getattr(lm.model.config, "layer_types", None))
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    with dp.trial(units.split(",")):
        pass
    assert getattr(lm.model.config, "layer_types", None) == dense_types  # a rolled-back trial restores them
    for unit in units.split(","):
        dp.prune(unit)
    lm.model.config.use_cache = True
    ids = lm.example_inputs[0][:, :8]
    export(lm, "depthprune", tmp_path / "dp")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "dp", trust_remote_code=True).eval()
    for model in (lm.model, remote):
        out = greedy(model, ids[:, :6])  # 12 new tokens: past Gemma's sliding window of 8
        assert torch.equal(out[:, 6:], logits(model, out[:, :-1], use_cache=False).argmax(-1)[:, 5:])
        with torch.no_grad():
            past = model(input_ids=ids[:, :6], use_cache=True).past_key_values
            step = model(input_ids=ids[:, 6:], past_key_values=past, use_cache=True).logits
        assert torch.allclose(step, logits(model, ids, use_cache=False)[:, 6:], atol=1e-5)


@pytest.mark.unit
def test_hf_trims_per_layer_config_lists():
    from transformers import Qwen2Config
    from depthprune.export.hf import exported_config
    cfg = Qwen2Config(num_hidden_layers=4, use_cache=False, eos_token_id=[1, 2, 3, 4],
                      layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    out = exported_config(cfg, [0, 1, 3], 4)
    assert out.num_hidden_layers == 3 and out.use_cache
    assert out.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert out.eos_token_id == [1, 2, 3, 4]  # a list of the old layer count that is not per layer
    assert cfg.num_hidden_layers == 4  # the model's own config is untouched


@pytest.mark.unit
@pytest.mark.parametrize("units,named", [
    (["model.layers.1.self_attn"], "model.layers.1.self_attn (zero)"),
    (["model.layers.0.mlp.gate_proj"], "model.layers.0.mlp.gate_proj (identity)"),
    ([f"model.layers.1.{u}" for u in MLP], "model.layers.1.mlp.act_fn (one)"),
])
def test_hf_refuses_partial_blocks(tmp_path, units, named):
    lm, _ = pruned_llama(2, units)
    with pytest.raises(UserError, match="whole decoder blocks") as e:
        export(lm, "hf", tmp_path / "hf")
    assert named in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- nemotron-nas
def mixed_units():
    return ([f"model.layers.1.{u}" for u in BLOCK]  # whole block
            + ["model.layers.2.self_attn"]  # attention removed
            + [f"model.layers.3.{u}" for u in MLP])  # MLP sublayer removed


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
def test_nemotron_nas_round_trip(tmp_path, tied):
    from transformers import AutoModelForCausalLM
    # intermediate 256 needs no padding; block 4's MLP narrowed to 200 does (-> 256)
    lm, _ = pruned_llama(6, mixed_units(), narrow={4: 200}, intermediate_size=256, tie_word_embeddings=tied)
    result = export(lm, "nemotron-nas", tmp_path / "nas")
    assert result.extra_params == 3 * 64 * (256 - 200)
    assert result.params == count_params(lm.model) + result.extra_params
    assert any(n.startswith("warning: llama.cpp") and "blocks [3]" in n for n in result.notes)  # MLP-only no-op
    cfg = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["num_hidden_layers"] == 5 and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    attn = [b["attention"] for b in cfg["block_configs"]]
    ffn = [b["ffn"] for b in cfg["block_configs"]]
    assert [a["no_op"] for a in attn] == [False, True, False, False, False]
    assert [a["n_heads_in_group"] for a in attn] == [2, None, 2, 2, 2]
    assert [f["no_op"] for f in ffn] == [False, False, True, False, False]
    assert [f["ffn_mult"] for f in ffn] == [6.0, 6.0, None, 6.0, 6.0]
    assert not any(a["replace_with_linear"] or f["replace_with_linear"] for a, f in zip(attn, ffn))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nas", dtype=torch.float32, trust_remote_code=True).eval()
    layers = model.model.layers
    assert layers[1].self_attn is None and layers[1].input_layernorm is None
    assert layers[2].mlp is None and layers[2].post_attention_layernorm is None
    assert [l.self_attn.cache_index for l in layers if l.self_attn is not None] == [0, 1, 2, 3]
    padded = layers[3].mlp  # the pruned model's block 4
    assert padded.gate_proj.out_features == 256
    assert not padded.gate_proj.weight[200:].any() and not padded.down_proj.weight[:, 200:].any()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_same_model(lm, model)
    # a left-padded batch: the same tokens row by row as the pruned model
    ids = lm.example_inputs[0][:, :6].repeat(2, 1)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    assert torch.equal(greedy(lm.model, ids, attention_mask=mask), greedy(model, ids, attention_mask=mask))


@pytest.mark.unit
def test_nemotron_nas_llama3_rope(tmp_path):
    from transformers import AutoModelForCausalLM
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    lm, _ = pruned_llama(3, ["model.layers.1.self_attn"], rope_parameters=rope, max_position_embeddings=512)
    export(lm, "nemotron-nas", tmp_path / "nas")
    cfg = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nas", dtype=torch.float32, trust_remote_code=True)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))  # past the original 64
    assert (logits(lm.model, ids, use_cache=False) - logits(model.eval(), ids)).abs().max() <= 1e-5


@pytest.mark.unit
@pytest.mark.parametrize("units,named", [
    (["model.layers.0.mlp.gate_proj"], ["model.layers.0.mlp.gate_proj (identity)", "model.layers.0.mlp.act_fn (identity)"]),
    (["model.layers.1.mlp.down_proj"], ["model.layers.1.mlp.down_proj (identity)"]),
    (["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"],
     ["model.layers.0.post_attention_layernorm (identity)", "model.layers.0.mlp.act_fn (one)"]),
])
def test_nemotron_nas_refuses_inexpressible_states(tmp_path, units, named):
    lm, _ = pruned_llama(2, units)
    with pytest.raises(UserError, match="cannot express") as e:
        export(lm, "nemotron-nas", tmp_path / "nas")
    assert all(n in str(e.value) for n in named), str(e.value)
    assert "--format depthprune" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_nemotron_nas_refuses_narrowed_attention(tmp_path):
    lm, dp = pruned_llama(2, [])
    dp.apply({"op": "width", "unit": "heads", "items": [["model.layers.0.self_attn.v_proj", "out", list(range(16))],
                                                        ["model.layers.0.self_attn.o_proj", "in", list(range(16))]]})
    with pytest.raises(UserError, match=r"model.layers.0.self_attn.v_proj \(width 64->16"):
        export(lm, "nemotron-nas", tmp_path / "nas")


@pytest.mark.unit
def test_ffn_width_formula_and_padding():
    # the reference formula on published configs: Llama-3_1-Nemotron-51B (hidden 8192)
    assert ffn_width(5.25, 8192) == 28672 and ffn_width(1.3125, 8192) == 7168
    assert ffn_width(4.0, 576) == 1536  # SmolLM2-135M's MLP
    assert [padded_width(w) for w in (1, 200, 256, 257, 1536)] == [256, 256, 256, 512, 1536]
    for hidden in (64, 576, 777, 1000, 4096, 5120, 8192):
        for width in range(256, 8 * hidden + 256, 256):
            m = ffn_mult_for(width, hidden)
            assert ffn_width(m, hidden) == width and ffn_width(round(m, 6), hidden) == width
    with pytest.raises(ValueError):
        ffn_mult_for(200, 64)


@pytest.mark.unit
def test_ffn_width_matches_mlx_lm():
    nas = pytest.importorskip("mlx_lm.models.nemotron-nas", reason="mlx-lm not installed")
    for hidden in (64, 576, 8192):
        for width in range(256, 6 * hidden, 256):
            m = ffn_mult_for(width, hidden)
            assert nas._ffn_mult_to_intermediate_size(nas.FFNConfig(ffn_mult=m).ffn_mult, hidden) == width


# ---------------------------------------------------------------- onnx (YOLO)
@pytest.mark.integration
def test_onnx_yolo_matches_pruned_model(tmp_path):
    pytest.importorskip("ultralytics")
    ort = pytest.importorskip("onnxruntime")
    from depthprune.adapters.load import load_model
    from depthprune.adapters.yolo import fuse_stand_ins
    lm = load_model("yolov5n.yaml")
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)
    for u in ["model.2.m.0.cv1.conv", "model.4.cv1.conv", "model.6.m.1.cv2.conv", "model.9.cv1.conv"]:
        dp.prune(u)
    # the blocks whose conv or bn is a stand-in are put in fused form (ultralytics' fuse needs both)
    assert len(fuse_stand_ins(copy.deepcopy(lm.model))) == 4
    result = export(lm, "onnx", tmp_path / "onnx")
    assert result.files == ["model.onnx"]
    x = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = lm.forward_fn(lm.model, (x,))
    assert got.shape == want.shape == (1, 84, 8400)
    assert (got - want).abs().max() <= 1e-3  # BN folding reorders float sums; measured ~3e-5 (boxes in pixels)


@pytest.mark.unit
def test_format_must_fit_the_family(tmp_path):
    lm, _ = pruned_llama(2, [])
    with pytest.raises(UserError, match="does not apply to a causal_lm model"):
        export(lm, "onnx", tmp_path / "o")
    with pytest.raises(UserError, match="unknown export format"):
        export(lm, "tflite", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CLI
def run_cli(*args, cwd):
    return cli_run.run_cli(list(args), cwd=cwd)


@pytest.mark.unit
def test_cli_export_and_bad_input(tmp_path):
    from depthprune.adapters.load import load_model
    from depthprune.depth.plan import fingerprint
    from depthprune.io.model_dir import save_pruned
    lm = load_model("random-llama:3")
    fp = fingerprint(lm.model)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=renumber_attention_layers)
    for u in [f"model.layers.1.{u}" for u in BLOCK] + ["model.layers.2.self_attn"]:
        dp.prune(u)
    save_pruned(dp, tmp_path / "p", "random-llama:3", fp)
    r = run_cli("export", "p", "--format", "nemotron-nas", "--out", "nas", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "zero-padded (exact) in blocks 0 (128->256), 2 (128->256): +49,152 parameters" in r.stdout
    assert (tmp_path / "nas" / "modeling_decilm.py").is_file()
    (tmp_path / "empty").mkdir()
    before = sorted(os.listdir(tmp_path))
    nas_files = sorted(os.listdir(tmp_path / "nas"))
    for args, says in [
        (("p", "--format", "hf", "--out", "hf"), "model.layers.2.self_attn (zero)"),  # inexpressible plan
        (("p", "--format", "hf", "--out", "nas"), "nas exists"),  # OUT exists: never overwritten
        (("empty", "--format", "hf", "--out", "hf"), "not a pruned-model directory"),
    ]:
        r = run_cli("export", *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("depthprune: error:") and says in lines[0], (args, r.stderr)
        assert sorted(os.listdir(tmp_path)) == before  # nothing created, no temporary sibling left
    assert sorted(os.listdir(tmp_path / "nas")) == nas_files


# ---------------------------------------------------------------- engines this project did not write
@pytest.mark.integration
@pytest.mark.slow
def test_mlx_lm_generates_the_same_tokens(smollm2, tmp_path):
    try:
        mlx_lm = importlib.import_module("mlx_lm")
    except ImportError:
        pytest.skip("mlx-lm is not installed (pip install mlx mlx-cpu mlx-lm)")
    lm = copy.copy(smollm2)
    lm.model = copy.deepcopy(smollm2.model)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=renumber_attention_layers)
    units = ([f"model.layers.20.{u}" for u in BLOCK] + ["model.layers.10.self_attn", "model.layers.25.self_attn"]
             + [f"model.layers.15.{u}" for u in MLP])
    for u in units:
        dp.prune(u)
    result = export(lm, "nemotron-nas", tmp_path / "nas")
    assert result.extra_params == 0  # 1536 = 6 * 256
    tok = lm.tokenizer
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    lm.model.config.use_cache = True
    out = lm.model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    want = out[0, ids.shape[1]:].tolist()
    model, mtok = mlx_lm.load(str(tmp_path / "nas"), tokenizer_config={"trust_remote_code": True})
    assert sum(layer.self_attn is None for layer in model.layers) == 2
    assert sum(layer.mlp is None for layer in model.layers) == 1 and len(model.layers) == 29
    got = [r.token for r in mlx_lm.stream_generate(model, mtok, ids[0].tolist(), max_tokens=20)]
    assert got == want, (tok.decode(got), tok.decode(want))
