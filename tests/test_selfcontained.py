"""Self-contained output directories and the depthprune format: loads without the base model,
without a trace and without depthprune; equal outputs, kept dtype, tied embeddings."""
from __future__ import annotations

import copy
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from depthprune.adapters.load import load_model
from depthprune.adapters.hf import random_llama, wrap
from depthprune.depth import DepthPruner, count_params
from depthprune.depth.plan import fingerprint
from depthprune.io.model_dir import load_pruned, save_pruned

UNITS = ["model.layers.0.self_attn", "model.layers.1.mlp.gate_proj",
         *[f"model.layers.2.{u}" for u in ("self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def pruned(tmp_path, model, units=UNITS, name="out"):
    lm = wrap(model, "random-llama:3")
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    fp = fingerprint(lm.model)
    for u in units:
        dp.prune(u)
    out = save_pruned(dp, tmp_path / name, "random-llama:3", fp, lm=lm)
    return lm, out


def no_base(monkeypatch):
    """Any attempt to build the base model from its spec fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the base model was loaded")
    monkeypatch.setattr("depthprune.adapters.load.load_model", refuse)
    monkeypatch.setattr("depthprune.io.model_dir.load_model", refuse)  # the name the loading code calls


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
def test_loads_without_base_equal_outputs_and_tied_embeddings(tmp_path, monkeypatch, tied):
    lm, out = pruned(tmp_path, random_llama(3, tie_word_embeddings=tied))
    assert (out / "structure.json").is_file() and (out / "graph.json").is_file()
    no_base(monkeypatch)
    lm2, _ = load_pruned(out)
    ids = lm.example_inputs[0]
    assert torch.equal(logits(lm2.model, ids), logits(lm.model, ids))
    assert str(lm2.model) == str(lm.model) and count_params(lm2.model) == count_params(lm.model)
    assert (lm2.model.lm_head.weight is lm2.model.model.embed_tokens.weight) == tied


@pytest.mark.unit
def test_dtype_is_kept(tmp_path):
    lm, out = pruned(tmp_path, random_llama(3).to(torch.bfloat16))
    lm2, _ = load_pruned(out)
    assert {p.dtype for p in lm2.model.parameters()} == {torch.bfloat16}
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ids = lm.example_inputs[0]
    assert torch.equal(logits(lm2.model, ids), logits(lm.model, ids))


@pytest.mark.unit
def test_sparsified_dir_with_added_biases_loads_self_contained(tmp_path, monkeypatch):
    from depthprune.eval import calibration_batches
    from depthprune.sparsity import sparsify
    lm, out = pruned(tmp_path, random_llama(3))
    lm2, _ = load_pruned(out)
    batches = calibration_batches(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)), 2)
    res = sparsify(lm2.model, "stade", lm2.example_inputs, lm2.forward_fn, batches, sparsity=0.5, progress=False)
    assert res["added_bias"]  # STADE gave some layer a bias
    from depthprune.io.model_dir import write_dir
    write_dir(tmp_path / "sparse", {"plan.json": (out / "plan.json").read_text()}, None, lm=lm2)
    no_base(monkeypatch)
    lm3, _ = load_pruned(tmp_path / "sparse")
    ids = lm.example_inputs[0]
    assert torch.equal(logits(lm3.model, ids), logits(lm2.model, ids))
    assert lm3.model.get_submodule(res["added_bias"][0]).bias is not None


@pytest.mark.unit
def test_save_pretrained_of_a_pruned_model_writes_the_depthprune_format(tmp_path):
    from transformers import AutoModelForCausalLM
    lm, _ = pruned(tmp_path, random_llama(3))
    lm.model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="trust_remote_code"):  # never the base model with random layers
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = lm.example_inputs[0]
    assert torch.equal(logits(m, ids), logits(lm.model, ids))
    # and greedy generation with the KV cache gives the same tokens
    lm.model.config.use_cache = True
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids[:, :4], **kw), lm.model.generate(ids[:, :4], **kw))


def _venv_without_depthprune(tmp_path) -> Path:
    """A virtual environment with the running one's packages (plain paths: its .pth files, such
    as the editable depthprune, are not processed) but not depthprune."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    shared = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    (purelib / "shared_deps.pth").write_text("\n".join(dict.fromkeys(shared)) + "\n")
    return py


@pytest.mark.slow
def test_depthprune_format_loads_where_depthprune_is_not_installed(tmp_path):
    from depthprune.export import export
    lm, out = pruned(tmp_path, random_llama(3))
    export(out, "depthprune", tmp_path / "exported")
    ids = lm.example_inputs[0]
    torch.save(logits(lm.model, ids), tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    py = _venv_without_depthprune(tmp_path)
    code = f"""
import importlib.util, torch
assert importlib.util.find_spec("depthprune") is None, "depthprune is importable"
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'exported')!r}, trust_remote_code=True)
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    got = m(input_ids=ids, use_cache=False).logits
print((got - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    r = subprocess.run([str(py), "-c", code], cwd=run_dir, env={**env, "HF_HOME": str(tmp_path / "hf")},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.integration
def test_pruned_smollm2_reloads_bit_for_bit_without_the_base_on_disk(smollm2, tmp_path, monkeypatch):
    model = copy.deepcopy(smollm2.model)
    lm = copy.copy(smollm2)
    lm.model = model
    dp = DepthPruner(model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    fp = fingerprint(model)
    for u in ("model.layers.5.self_attn", "model.layers.9.mlp.up_proj", "model.layers.20.self_attn",
              *[f"model.layers.27.{u}" for u in ("self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]):
        dp.prune(u)
    out = save_pruned(dp, tmp_path / "out", "smollm2-135m", fp, lm=lm)
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "empty-cache"))
    no_base(monkeypatch)
    lm2, _ = load_pruned(out)
    ids = lm.example_inputs[0]
    assert torch.equal(logits(lm2.model, ids), logits(model, ids))
    assert lm2.tokenizer is not None and lm2.tokenizer("To be").input_ids == lm.tokenizer("To be").input_ids
    assert not (tmp_path / "empty-cache").exists()
    # lm-eval tasks on the directory (its tokenizer is loaded on first use) equal the model in memory
    pytest.importorskip("lm_eval")
    from test_eval import write_task

    from depthprune.eval.tasks import run_tasks
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    (tmp_path / "task").mkdir()
    write_task(tmp_path / "task")
    on_dir = run_tasks(lm2.model, lm2.tokenizer, ["tiny_mc"], include_path=str(tmp_path / "task"))
    in_memory = run_tasks(model, lm.tokenizer, ["tiny_mc"], include_path=str(tmp_path / "task"))
    assert on_dir == in_memory and 0 <= on_dir["tiny_mc"]["acc"] <= 1
