"""Devices and precision (--device, --dtype): the model stays in the dtype it was given or asked
for, through pruning, compensation, sparsity and every written file; a device that is not
there is one line. Device-moving paths run here with ``device="cpu"`` passed explicitly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_run import assert_one_line_error, run_cli


def saved_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def bf16_hf_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers in bfloat16 (its config says so)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("bf16") / "hf"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


@pytest.mark.integration
def test_dtype_is_kept_or_set_in_every_written_tensor(tmp_path, bf16_hf_dir):
    units = ["--units", "model.layers.1.self_attn,model.layers.2.mlp.up_proj"]
    # the checkpoint's own dtype (auto): bf16 in, bf16 out; --dtype float32 doubles the file
    r = run_cli(["prune", "--model", str(bf16_hf_dir), *units, "--out", str(tmp_path / "auto"), "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    r = run_cli(["prune", "--model", str(bf16_hf_dir), *units, "--out", str(tmp_path / "f32"), "--dtype", "float32"])
    assert r.returncode == 0, r.stderr
    assert saved_dtypes(tmp_path / "auto" / "model.safetensors") == {"BF16"}
    assert saved_dtypes(tmp_path / "f32" / "model.safetensors") == {"F32"}
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("auto", "f32")}
    assert 0.45 < size["auto"] / size["f32"] < 0.55, size
    # a float32 spec asked for in bf16: written bf16, and transformers loads it bf16
    r = run_cli(["prune", "--model", "random-llama:2", "--units", "model.layers.1.self_attn", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "bf")])
    assert r.returncode == 0, r.stderr
    assert saved_dtypes(tmp_path / "bf" / "model.safetensors") == {"BF16"}
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf"), trust_remote_code=True, dtype="auto")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    # later commands keep the directory's dtype; an export may change it
    r = run_cli(["sparsify", "--model", str(tmp_path / "bf"), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tmp_path / "bfs")])
    assert r.returncode == 0, r.stderr
    assert saved_dtypes(tmp_path / "bfs" / "model.safetensors") == {"BF16"}
    r = run_cli(["export", str(tmp_path / "bfs"), "--format", "depthprune", "--dtype", "float16",
                 "--out", str(tmp_path / "exp")])
    assert r.returncode == 0, r.stderr
    assert saved_dtypes(tmp_path / "exp" / "model.safetensors") == {"F16"}


@pytest.mark.integration
def test_a_device_that_is_not_there_is_one_line(tmp_path):
    for device, msg in (("cuda", "no CUDA GPU is available here") if not torch.cuda.is_available() else
                        ("cuda:99", "CUDA GPU(s)"), ("gpu", "--device must be")):
        r = run_cli(["prune", "--model", "random-llama:2", "--units", "model.layers.1.self_attn", "--device", device,
                     "--out", str(tmp_path / "o")])
        assert_one_line_error(r, msg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_bf16_pruning_with_compensation_on_an_explicit_device():
    """The library path in bf16, the device named: the selection, Prune(f) and the refits (solved
    in float64 where the tokens are, cast back) leave every tensor bf16 on that device."""
    from depthprune.adapters.load import calibration, load_model
    from depthprune.importance import PruneConfig, prune_to_target
    from depthprune.placement import Placement
    lm = load_model("random-llama:4", progress=False, placement=Placement("cpu", "bfloat16"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    batches = calibration(lm, "shakespeare:calib", 4, 32)
    assert all(b[0].device == torch.device("cpu") for b in batches)
    pruner, outcome = prune_to_target(lm, PruneConfig(0.25, "angular", "paper", "fine", compensate=True), batches,
                                      progress=False)
    assert outcome.reached and outcome.applied
    assert {(p.dtype, p.device.type) for p in lm.model.parameters()} == {(torch.bfloat16, "cpu")}
    with torch.no_grad():
        logits = lm.model(input_ids=batches[0][0]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.unit
def test_cli_dtype_names_are_the_library_names():
    from depthprune import placement
    from depthprune.cli import args as cli_args
    assert cli_args.DTYPES == placement.DTYPES
