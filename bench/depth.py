"""Depth pruning on SmolLM2-135M with the packaged text: scoring cost and quality vs reduction.

Prints, in one run:
(a) the time of angular scoring of every fine unit (caching the block inputs included) divided by
    the time of one dense forward over the same calibration set (and, apart, the one-off Taylor
    gradient pass that picks reconciliation channels);
(b) held-out perplexity (Hamlet) at 10 %, 20 % and 30 % parameter reduction for fine units
    (several schedules), attention/MLP sublayers, whole blocks (angular = ShortGPT-like block
    influence) and Gromov et al.'s window, all with the same calibration.

    python bench/depth.py [--calib-samples 16 --seq-len 256] [--configs fine:paper,mixed:shared:ce,...]

A config is GRANULARITY:SCHEDULE[:SCORE[:K]][:comp] (SCORE defaults to --score; K is the lazy
re-scoring budget of re-scoring schedules, `--rescore-top`, default 0 = re-score all; a final
``comp`` turns on training-free compensation, `--compensate`).
"""
from __future__ import annotations

import argparse
import dataclasses
import copy
import time

import torch

from depthprune.adapters import calibration, load_model
from depthprune.adapters.text import load_text
from depthprune.eval import perplexity
from depthprune.importance import prune_to_target

CONFIGS = "fine:paper,fine:shared,fine:iterative,fine:shared-iterative,sublayer:paper,sublayer:shared-iterative," \
          "block:paper,block:window"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--score", default="angular")
    ap.add_argument("--trace", action="store_true", help="print every pruned group")
    ap.add_argument("--levels", default="0.1,0.2,0.3", help="parameter reductions to evaluate")
    a = ap.parse_args()
    levels = tuple(float(x) for x in a.levels.split(","))
    base = load_model("smollm2-135m")
    batches = calibration(base, "shakespeare:calib", a.calib_samples, a.seq_len)
    hamlet = load_text("shakespeare:eval")
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            base.model(input_ids=b[0], use_cache=False)
    dense = time.perf_counter() - t0
    dense_ppl = perplexity(base.model, base.tokenizer, hamlet, max_windows=a.eval_windows)
    print(f"dense forward over {a.calib_samples}x{a.seq_len} tokens: {dense:.1f} s; Hamlet ppl {dense_ppl:.2f}",
          flush=True)
    table = []
    for cfg in a.configs.split(","):
        gran, sched, *rest = cfg.split(":")
        comp = bool(rest) and rest[-1] == "comp"
        rest = rest[:-1] if comp else rest
        score = rest[0] if rest else a.score
        top = int(rest[1]) if len(rest) > 1 else 0
        got: dict[float, tuple] = {}
        # paper and iterative never look at the target before reaching it: one run, read on the
        # way; the others (per-parameter toward the target, Gromov's window) get one run per level
        prefix = sched in ("paper", "iterative")
        for tgt in [max(levels)] if prefix else levels:
            lm = dataclasses.replace(base, model=copy.deepcopy(base.model))

            def on_step(r, lm=lm, tgt=tgt):
                for lv in levels:
                    if (prefix or lv == tgt) and r >= lv and lv not in got:
                        got[lv] = (r, perplexity(lm.model, lm.tokenizer, hamlet, max_windows=a.eval_windows))
                        print(f"  {cfg} {lv:.0%}: {got[lv][1]:.2f} (at {r:.1%}, {time.perf_counter() - t0:.0f} s)",
                              flush=True)

            t0 = time.perf_counter()
            pruner, out = prune_to_target(lm, tgt, score, sched, gran, batches, progress=False,
                                          on_step=on_step, rescore_top=top, compensate=comp)
            wall = time.perf_counter() - t0
            if a.trace:
                for u in out.applied:
                    print(f"    {u['unit']:<34} {u['kind']:<10} {u['params_removed']:>10,d}  {u['reduction']:6.1%}"
                          f"  score {u['score']:.4g}", flush=True)
        row = (gran, f"{sched} ({score}{f', top {top}' if top else ''}{', compensated' if comp else ''})", got, out,
               wall)
        table.append(row)
        print(f"{gran:<8} {sched:<16} {score:<8} " + "  ".join(f"{lv:.0%}: {got[lv][1]:8.2f} (at {got[lv][0]:.1%})"
                                                     for lv in levels if lv in got)
              + f"  | scoring {out.scoring_seconds:.0f} s = {out.scoring_seconds / dense:.1f} dense fwds; "
                f"taylor channel pass {out.channel_seconds:.0f} s; {len(out.applied)} steps", flush=True)
    print()
    print("| granularity | schedule | " + " | ".join(f"ppl @{lv:.0%}" for lv in levels) + " | scoring / dense fwd | steps |")
    print("|---|---|" + "---|" * (len(levels) + 2))
    print(f"| dense | - | {dense_ppl:.2f} |" + " |" * (len(levels) + 1))
    for gran, sched, got, out, wall in table:
        cells = [f"{got[lv][1]:.2f} ({got[lv][0]:.1%})" if lv in got else "-" for lv in levels]
        print(f"| {gran} | {sched} | " + " | ".join(cells) + f" | {out.scoring_seconds / dense:.1f} | {len(out.applied)} |")


if __name__ == "__main__":
    main()
