"""Healing a pruned language model by distillation from its dense base (`depthprune.heal`).

For one pruned output directory, trains a fresh copy per setting (loss kd / ce / kd+ce with every
parameter; kd with LoRA; kd with the last N blocks) for the same step budget and prints one row
each: trainable parameters, seconds, held-out perplexity and KL to the teacher before and after
(the last tenth of the training text, never trained on), and the perplexity on text of another
kind (``pydoc:reference``: forgetting shows there).

    python bench/heal.py --model out/p20 [--text shakespeare:calib --steps 200 --seq-len 256 --batch-size 8]
    python bench/heal.py --tiny      # random-llama:4 with block 2 pruned, 20 steps a row (measured 4.5 min
                                     # on 2 cores shared with a test run; the rows themselves 15-150 s)

The full rows on SmolLM2-135M (``depthprune prune --model smollm2-135m --target 0.2 --out
out/p20``, 200 steps of 8 x 256 tokens per row) have not been timed yet; short ones have (30 steps
of 4 x 128 on a ``--effort fast`` 21 % prune, ``--settings kd/all,kd/lora:8``): about 260 s a row on
2 CPU threads, held-out KL 0.584 -> 0.470 (all) and -> 0.545 (lora:8).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from depthprune.adapters.load import load_model  # noqa: E402
from depthprune.adapters.text import load_text  # noqa: E402
from depthprune.adapters.tokens import tokenizer_of  # noqa: E402
from depthprune.eval.text import perplexity  # noqa: E402
from depthprune.heal import HealConfig, heal, load_training_text, split_windows  # noqa: E402
from depthprune.io.model_dir import load_pruned, read_plan  # noqa: E402

SETTINGS = [("kd", "all"), ("ce", "all"), ("kd+ce", "all"), ("kd", "lora:8"), ("kd", "last:2")]


def tiny_pruned_dir(root: str) -> str:
    """random-llama:4 with the attention and MLP down projection of block 2 removed, as an output directory."""
    from depthprune.depth import DepthPruner
    from depthprune.depth.plan import fingerprint
    from depthprune.io.model_dir import save_pruned
    lm = load_model("random-llama:4", progress=False)
    fp = fingerprint(lm.model)
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    for unit in ("model.layers.2.self_attn", "model.layers.2.mlp.down_proj"):
        pruner.prune(unit)
    out = os.path.join(root, "pruned")
    save_pruned(pruner, out, "random-llama:4", fp, lm=lm)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a pruned output directory (its plan names the dense teacher)")
    ap.add_argument("--tiny", action="store_true", help="random-llama:4 pruned here; short runs")
    ap.add_argument("--text", default="shakespeare:calib")
    ap.add_argument("--other-text", default="pydoc:reference")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--settings", default=",".join(f"{l}/{t}" for l, t in SETTINGS))
    a = ap.parse_args()
    if not a.model and not a.tiny:
        ap.error("give --model DIR (a pruned output directory) or --tiny")
    tmp = tempfile.TemporaryDirectory(prefix="bench-heal-")
    if a.tiny:
        a.model = a.model or tiny_pruned_dir(tmp.name)
        a.text, a.steps, a.seq_len, a.batch_size, a.lr = "shakespeare:macbeth", 20, 64, 4, 3e-3
    plan = read_plan(a.model)
    teacher = load_model(plan["base"], progress=False).model
    lm0, _ = load_pruned(a.model, progress=False)
    tok = tokenizer_of(lm0)
    ids = tok(load_training_text(a.text), return_tensors="pt").input_ids[0]
    train, heldout = split_windows(ids, a.seq_len)
    other = load_text(a.other_text, "--other-text")
    other_windows = 4 if a.tiny else 16

    def other_ppl(model):
        return perplexity(model, tok, other, seq_len=a.seq_len, max_windows=other_windows, progress=False)

    print(f"model {a.model} (teacher {plan['base']}); text {a.text}: {len(train)} training windows, "
          f"{len(heldout)} held out, {a.seq_len} tokens each; {a.steps} steps of {a.batch_size} windows, lr {a.lr}")
    print(f"dense teacher: {a.other_text} perplexity {other_ppl(teacher):.3f}")
    header = (f"| {'loss':6} | {'train':7} | {'trainable':>10} | {'seconds':>7} | {'held-out ppl':>19} | "
              f"{'KL to teacher':>17} | {a.other_text + ' ppl':>21} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for setting in a.settings.split(","):
        loss, train_what = setting.split("/")
        lm, _ = load_pruned(a.model, progress=False)
        other_before = other_ppl(lm.model)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model, info = heal(lm.model, teacher, train, heldout,
                           HealConfig(loss=loss, train=train_what, steps=a.steps, lr=a.lr, batch_size=a.batch_size))
        secs = time.perf_counter() - t0
        b, f = info["heldout_before"], info["heldout_after"]
        print(f"| {loss:6} | {train_what:7} | {info['trainable_params']:>10,} | {secs:>7.1f} | "
              f"{b['ppl']:>8.3f} -> {f['ppl']:>8.3f} | {b['kl']:>7.4f} -> {f['kl']:>7.4f} | "
              f"{other_before:>8.3f} -> {other_ppl(model):>8.3f} |", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
