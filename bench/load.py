"""Loading a pruned output directory against `from_pretrained` of the dense model, in one run.

Prunes SmolLM2-135M (a few attention and MLP units and a whole block, then STADE 50 % so the
directory also holds added biases), saves it as a depthprune output directory, then times, in
the same process and interleaved (median of ``--repeats`` after one warm-up):

- ``from_pretrained`` of the dense SmolLM2-135M (the converted safetensors in the user cache);
- `depthprune.io.model_dir.load_pruned` of the pruned directory (structure + safetensors: no
  base model, no trace);
- ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` of the same directory
  (the depthprune format, what other tools load).

    python bench/load.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from depthprune.adapters.load import calibration, load_model
from depthprune.adapters.packaged import cache_dir
from depthprune.depth import DepthPruner, count_params
from depthprune.depth.plan import fingerprint
from depthprune.io.model_dir import load_pruned, save_pruned
from depthprune.sparsity import sparsify

UNITS = ["model.layers.3.self_attn", "model.layers.11.mlp.gate_proj", "model.layers.17.self_attn",
         *[f"model.layers.24.{u}" for u in ("self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    lm = load_model("smollm2-135m")
    dense_dir = cache_dir() / "models" / "smollm2-135m"
    fp = fingerprint(lm.model)
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    for u in UNITS:
        dp.prune(u)
    batches = calibration(lm, "shakespeare:calib", 2, 128)
    sparsify(lm.model, "stade", lm.example_inputs, lm.forward_fn, batches, sparsity=0.5, progress=False)
    out = Path(tempfile.mkdtemp()) / "pruned"
    save_pruned(dp, out, "smollm2-135m", fp, lm=lm)
    ref = lm.model(input_ids=lm.example_inputs[0], use_cache=False).logits
    loaders = {
        "dense from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32),
        "pruned load_pruned": lambda: load_pruned(out)[0].model,
        "pruned from_pretrained(trust_remote_code)": lambda: AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=True, dtype=torch.float32),
    }
    times: dict[str, list] = {k: [] for k in loaders}
    for r in range(a.repeats + 1):
        for name, load in loaders.items():
            t0 = time.perf_counter()
            m = load()
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            if r == 0 and name != "dense from_pretrained":  # the loaded model is the pruned one
                with torch.no_grad():
                    diff = (m(input_ids=lm.example_inputs[0], use_cache=False).logits - ref).abs().max().item()
                print(f"{name}: {count_params(m):,d} parameters, max |logit difference| {diff:.2e}")
            del m
    dense = statistics.median(times["dense from_pretrained"])
    print(f"\nmedian of {a.repeats} interleaved loads after one warm-up ({torch.get_num_threads()} threads):\n")
    print("| loader | seconds | / dense from_pretrained |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {med / dense:.2f} |")


if __name__ == "__main__":
    main()
