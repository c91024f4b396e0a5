"""What choosing the units costs: wall time and held-out perplexity of each `prune --effort`
against ShortGPT + compensation and plain block angular, on SmolLM2-135M (issue 35).

Prints, in one run, for every calibration size of ``--sizes`` (samples x tokens) and the
``--target`` reduction: per row the selection's wall time (loading excluded; the same calibration
batches for every row), that time over ShortGPT + compensation's, and perplexity on every
``--eval-texts`` text (default Hamlet, held out from the calibration plays, and the Python
reference: a kind of text the default calibration does not contain). Then, with ``--small``,
the wall time of the whole command ``depthprune prune --model smollm2-135m --target 0.05
--calib-samples 2 --seq-len 64`` (a new process: imports and loading included).

    python bench/selection_cost.py [--sizes 4x256,8x256] [--rows fast,balanced,best,angular] [--small]

Rows: ``fast``, ``balanced`` (the default) and ``best`` are `prune --effort` (the recipe's
bundles, models/recipes/llama.yaml; ``fast`` is ShortGPT's block influence, one shot, with
compensation after every block); ``angular`` is block angular distance without compensation
(`--granularity block --score angular`); ``balanced-full`` is balanced with every group of the mixed
pool scored in the first pass (`--no-defer-nested`, the default before the MLP transforms waited
for their MLP).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import torch

from depthprune.adapters.load import calibration, load_model
from depthprune.adapters.text import load_text
from depthprune.eval import perplexity
from depthprune.importance import PruneConfig, prune_to_target

ROWS = {"fast": PruneConfig(effort="fast"), "balanced": PruneConfig(effort="balanced"),
        "best": PruneConfig(effort="best"),
        "balanced-full": PruneConfig(effort="balanced", defer_nested=False),
        "angular": PruneConfig(score="angular", schedule="paper", granularity="block", compensate=False)}


def small_run() -> float:
    """Wall seconds of the whole small-target command, in a new process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "depthprune.cli", "prune", "--model", "smollm2-135m", "--target",
                            "0.05", "--calib-samples", "2", "--seq-len", "64", "-q", "--out",
                            os.path.join(tmp, "out")], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"the small-target run failed: {r.stderr.strip()[-500:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4x256,8x256", help="calibration sizes, SAMPLESxTOKENS")
    ap.add_argument("--rows", default="fast,balanced,best,angular", help=f"of {', '.join(ROWS)}")
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--calib", default="shakespeare:calib", help="calibration text spec(s), as prune --calib")
    ap.add_argument("--eval-texts", default="shakespeare:eval,pydoc:reference")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--small", action="store_true", help="also time the small-target command")
    a = ap.parse_args()
    rows = a.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows {unknown}; use {', '.join(ROWS)}")
    base = load_model("smollm2-135m", progress=False)
    texts = {s: load_text(s) for s in a.eval_texts.split(",")}

    def ppls(model) -> list[float]:
        return [perplexity(model, base.tokenizer, t, max_windows=a.eval_windows, progress=False) for t in texts.values()]

    dense = ppls(base.model)
    print("dense: " + ", ".join(f"{k} {v:.2f}" for k, v in zip(texts, dense)) + f"; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    table = []
    for size in a.sizes.split(","):
        n, seq = (int(x) for x in size.split("x"))
        batches = calibration(base, a.calib, n, seq)
        walls = {}
        for row in rows:
            lm = dataclasses.replace(base, model=copy.deepcopy(base.model))
            t0 = time.perf_counter()
            _, out = prune_to_target(lm, dataclasses.replace(ROWS[row], target=a.target), batches, progress=False)
            walls[row] = time.perf_counter() - t0
            got = ppls(lm.model)
            table.append((size, row, out.params_after / out.params_before, walls[row], got))
            print(f"{size} {row}: {walls[row]:.0f} s, reduction {1 - out.params_after / out.params_before:.1%}, "
                  + ", ".join(f"{k} {v:.2f}" for k, v in zip(texts, got)), flush=True)
            del lm
    print(f"\nSmolLM2-135M, --target {a.target}, calibration {a.calib}; perplexity on {' / '.join(texts)} "
          f"({a.eval_windows} windows of 256 tokens); dense {' / '.join(f'{v:.2f}' for v in dense)}\n")
    print("| calibration | selection | reduction | wall (s) | x fast | " + " | ".join(texts) + " |")
    print("|---|---|---|---|---|" + "---|" * len(texts))
    for size, row, kept, wall, got in table:
        fast = next((w for s, r, _, w, _ in table if s == size and r == "fast"), None)
        ratio = f"{wall / fast:.1f}" if fast else "-"
        print(f"| {size} | {row} | {1 - kept:.1%} | {wall:.0f} | {ratio} | " + " | ".join(f"{v:.2f}" for v in got) + " |")
    if a.small:
        print(f"\n`depthprune prune --model smollm2-135m --target 0.05 --calib-samples 2 --seq-len 64`: "
              f"{small_run():.0f} s wall (a new process: imports and loading included)")


if __name__ == "__main__":
    main()
