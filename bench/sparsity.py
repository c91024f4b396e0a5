"""Intra-layer pruners on SmolLM2-135M with the packaged text.

Prints held-out perplexity (Hamlet) and pruning seconds for dense, magnitude, Wanda, STADE and
STADE-nobias at 50 %, 2:4 and 4:8, and for depth pruning to 20 % followed by STADE 50 %; and the
cost of Wanda/STADE in dense forwards over the calibration set.

    python bench/sparsity.py [--calib-samples 32 --seq-len 256] [--depth-dir DIR]

``--depth-dir`` takes a model written by ``depthprune prune --target 0.2``; without it the depth
row prunes to 20 % here (angular score, ``--depth-granularity``/``--depth-schedule``, default
fine units with Algorithm 8).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from depthprune.adapters.load import load_model
from depthprune.adapters.text import load_text
from depthprune.eval import calibration_batches, perplexity, token_windows
from depthprune.sparsity import sparsify
from depthprune.sparsity.sparsify import nonzero


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--depth-dir")
    ap.add_argument("--no-depth", action="store_true")
    ap.add_argument("--depth-schedule", default="paper")
    ap.add_argument("--depth-granularity", default="fine")
    ap.add_argument("--methods", default="magnitude,wanda,stade,stade-nobias")
    ap.add_argument("--settings", default="0.5,2:4,4:8")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = load_model("smollm2-135m")
    tok = base.tokenizer
    batches = calibration_batches(token_windows(tok, load_text("shakespeare:calib"), a.calib_samples, a.seq_len))
    hamlet = load_text("shakespeare:eval")

    def ppl(model):
        return perplexity(model, tok, hamlet, max_windows=a.eval_windows)

    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            base.model(input_ids=b[0], use_cache=False)
    dense_fwd = time.perf_counter() - t0
    rows = [("dense", "-", ppl(base.model), 0.0, nonzero(base.model))]
    print(f"one dense forward over {a.calib_samples}x{a.seq_len} calibration tokens: {dense_fwd:.1f} s", flush=True)
    for method in a.methods.split(","):
        for setting in a.settings.split(","):
            model = copy.deepcopy(base.model)
            kw = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
            t0 = time.perf_counter()
            sparsify(model, method, base.example_inputs, base.forward_fn, batches, progress=False, **kw)
            sec = time.perf_counter() - t0
            rows.append((method, setting, ppl(model), sec, nonzero(model)))
            print(f"{method:<13} {setting:<5} ppl {rows[-1][2]:9.2f}  {sec:6.1f} s "
                  f"({sec / dense_fwd:.2f} dense forwards)", flush=True)
            del model
    if a.no_depth:
        pass
    elif a.depth_dir:
        from depthprune.io.model_dir import load_pruned
        lm, _ = load_pruned(a.depth_dir)
        depth_model, depth_sec, label = lm.model, float("nan"), f"depth 20 % ({a.depth_dir})"
    else:
        import dataclasses
        from depthprune.importance import PruneConfig, prune_to_target
        lm = dataclasses.replace(base, model=copy.deepcopy(base.model))
        t0 = time.perf_counter()
        prune_to_target(lm, PruneConfig(0.2, "angular", a.depth_schedule, a.depth_granularity, compensate=False), batches,
                        progress=False)
        depth_model = lm.model
        depth_sec = time.perf_counter() - t0
        label = f"depth 20 % (angular, {a.depth_granularity}, {a.depth_schedule})"
    if not a.no_depth:
        rows.append((label, "-", ppl(depth_model), depth_sec, nonzero(depth_model)))
        t0 = time.perf_counter()
        sparsify(depth_model, "stade", base.example_inputs, base.forward_fn, batches, sparsity=0.5, progress=False)
        rows.append((label + " + STADE", "0.5", ppl(depth_model), time.perf_counter() - t0, nonzero(depth_model)))
    print()
    print("| method | setting | Hamlet ppl | seconds | dense fwds | non-zero params |")
    print("|---|---|---|---|---|---|")
    for m, s, p, sec, nz in rows:
        print(f"| {m} | {s} | {p:.2f} | {sec:.1f} | {sec / dense_fwd:.2f} | {nz:,d} |")


if __name__ == "__main__":
    main()
