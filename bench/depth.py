"""Depth pruning on SmolLM2-135M with the packaged text: scoring cost and quality vs reduction.

Prints, in one run:
(a) the time of angular scoring of every fine unit (caching the block inputs included) divided by
    the time of one dense forward over the same calibration set (and, apart, the one-off Taylor
    gradient pass that picks reconciliation channels);
(b) held-out perplexity (Hamlet) at 10 %, 20 % and 30 % parameter reduction for fine units
    (several schedules), attention/MLP sublayers, whole blocks (angular = ShortGPT-like block
    influence) and Gromov et al.'s window, all with the same calibration.

    python bench/depth.py [--calib-samples 16 --seq-len 256] [--configs fine:paper,mixed:shared:ce,...]
        [--budget params|flops|kv-cache|latency] [--speed] [--threads 1]

``--budget`` says what the levels count (`prune --budget`; latency: estimated from a per-module
table profiled once on the dense model at ``--latency-seq-len`` tokens, default 1, one decode
step's matrix products without the cache; ``--latency-decode N``: one decode step after N cached
tokens, `depthprune profile --decode`). ``--speed`` keeps every row's model at every level and measures them
with the dense model in one interleaved run at the end: decode milliseconds per token with the
KV cache (32 tokens after a 128-token prompt, median of 5) and the fraction of the dense decode
latency removed.

A config is GRANULARITY:SCHEDULE[:SCORE[:K]][:comp[M[wW][i][o]]][+stade] (SCORE defaults to --score; K is the
lazy re-scoring budget of re-scoring schedules, `--rescore-top`, default 0 = re-score all; ``comp``
turns on training-free compensation, `--compensate`; ``compM`` also re-ranks the best ``M`` groups
of each step by their score once compensated, `--rescore-compensated M` (cross-fitted; a trailing ``i``
scores those trials in-sample instead), ``compall`` makes every score a compensated one,
`--rescore-compensated all`; ``compMwW`` adds the runs of 2..W whole blocks,
`--rescore-windows W`; a trailing ``o`` lets every other group compete by its cross-fitted
compensated score, `--rescore-outsiders` (the default of `prune --target`: ``comp8w4io``); ``+stade`` also sparsifies a copy of the
model at the ``--stade-level`` reduction with STADE 50 % on the same calibration and reports it
as its own row). Perplexity is measured on every ``--eval-texts`` text (default Hamlet, held out
from the calibration plays, and the Python reference, text of another kind). Cost per row:
scoring plus compensation time in dense forwards over the calibration set, and wall seconds, of
the run(s) that produced the row (prefix schedules: one run to the highest level).

The issue-18 table (8 x 256 calibration tokens):

    python bench/depth.py --calib-samples 8 --configs block:paper:bi,block:paper:bi:comp,\
block:window:angular-last,block:window:angular-last:comp,sublayer:paper:angular,sublayer:paper:angular:comp,\
fine:paper:angular,fine:paper:angular:comp+stade,mixed:shared-iterative:ce:8,mixed:shared-iterative:ce:8:comp
"""
from __future__ import annotations

import argparse
import dataclasses
import copy
import re
import time

import torch

from depthprune.adapters.load import calibration, load_model
from depthprune.adapters.text import load_text
from depthprune.eval import perplexity
from depthprune.eval.speed import SpeedSettings, decode_step, lm_speed
from depthprune.importance import BUDGETS, PruneConfig, profile_latency, prune_to_target
from depthprune.sparsity import sparsify

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
    ap.add_argument("--eval-texts", default="shakespeare:eval,pydoc:reference",
                    help="held-out texts for perplexity (the first is the headline)")
    ap.add_argument("--stade-level", type=float, default=0.2, help="reduction at which +stade configs sparsify")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--budget", choices=BUDGETS, default="params", help="what the levels count (prune --budget)")
    ap.add_argument("--latency-seq-len", type=int, default=1, help="tokens of the window --budget latency profiles")
    ap.add_argument("--latency-decode", type=int, default=0, metavar="N",
                    help="--budget latency: profile one decode step after N cached tokens instead (profile --decode)")
    ap.add_argument("--speed", action="store_true", help="measure decode latency of every row's models at the end")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    levels = tuple(float(x) for x in a.levels.split(","))
    base = load_model("smollm2-135m")
    batches = calibration(base, "shakespeare:calib", a.calib_samples, a.seq_len)
    texts = {spec: load_text(spec) for spec in a.eval_texts.split(",")}

    def ppls(model) -> tuple:
        return tuple(perplexity(model, base.tokenizer, t, max_windows=a.eval_windows, progress=False)
                     for t in texts.values())

    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            base.model(input_ids=b[0], use_cache=False)
    dense = time.perf_counter() - t0
    dense_ppl = ppls(base.model)
    print(f"dense forward over {a.calib_samples}x{a.seq_len} tokens: {dense:.1f} s; perplexity "
          + ", ".join(f"{k} {v:.2f}" for k, v in zip(texts, dense_ppl)), flush=True)
    latency = None
    if a.budget == "latency":
        n = a.latency_decode or a.latency_seq_len
        ids = torch.randint(0, base.model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        fwd, inputs = decode_step(base.model, ids) if a.latency_decode else (base.forward_fn, (ids,))
        latency = profile_latency(base.model, fwd, inputs, rounds=20, progress=False, decode_context=a.latency_decode)
        print(f"latency table: {1000 * latency.total_s:.2f} ms per "
              + (f"decode step after {n} cached tokens" if a.latency_decode else f"{n}-token forward")
              + f" (spread {latency.spread:.0%})", flush=True)
    kept: dict[str, torch.nn.Module] = {}  # --speed: (row, level) -> the pruned model at that level
    table = []
    for cfg in a.configs.split(","):
        stade = cfg.endswith("+stade")
        cfg = cfg.removesuffix("+stade")
        gran, sched, *rest = cfg.split(":")
        comp = bool(rest) and rest[-1].startswith("comp")
        m = re.fullmatch(r"comp(\d*|all)(?:w(\d+))?(i?)(o?)", rest[-1]) if comp else None
        if comp and m is None:
            raise SystemExit(f"bad compensation suffix {rest[-1]!r} in {cfg!r}: compM[wW][i][o]")
        comp_top, windows, in_sample, screen = (m[1] if m[1] == "all" else int(m[1] or 0), int(m[2] or 0), bool(m[3]),
                                                bool(m[4])) if m else (0, 0, False, False)
        rest = rest[:-1] if comp else rest
        score = rest[0] if rest else a.score
        top = int(rest[1]) if len(rest) > 1 else 0
        got: dict[float, tuple] = {}
        sparse: dict[float, tuple] = {}
        cost, wall = 0.0, 0.0
        # paper and iterative never look at the target before reaching it: one run, read on the
        # way; the others (per-parameter toward the target, Gromov's window) get one run per level
        prefix = sched in ("paper", "iterative")
        for tgt in [max(levels)] if prefix else levels:
            lm = dataclasses.replace(base, model=copy.deepcopy(base.model))

            def on_step(r, lm=lm, tgt=tgt):
                for lv in levels:
                    if (prefix or lv == tgt) and r >= lv and lv not in got:
                        got[lv] = (r, *ppls(lm.model))
                        if a.speed:
                            kept[f"{cfg} {lv:.0%}"] = copy.deepcopy(lm.model)
                        print(f"  {cfg} {lv:.0%}: " + " / ".join(f"{v:.2f}" for v in got[lv][1:])
                              + f" (at {r:.1%}, {time.perf_counter() - t0:.0f} s)", flush=True)
                        if stade and lv == a.stade_level:
                            m = copy.deepcopy(lm.model)
                            sparsify(m, "stade", lm.example_inputs, lm.forward_fn, batches, sparsity=0.5,
                                     progress=False)
                            sparse[lv] = (r, *ppls(m))
                            print(f"  {cfg} {lv:.0%} + STADE 50 %: " + " / ".join(f"{v:.2f}" for v in sparse[lv][1:]),
                                  flush=True)
                            del m

            t0 = time.perf_counter()
            # cross-fitting only changes the compensated re-ranking's trials (a config refuses it without one)
            config = PruneConfig(tgt, score, sched, gran, rescore_top=top, compensate=comp, compensated_top=comp_top,
                                 compensated_windows=windows, cross_fit=not in_sample and bool(comp_top), screen=screen,
                                 budget=a.budget)
            pruner, out = prune_to_target(lm, config, batches, progress=False, on_step=on_step, latency_table=latency)
            wall += time.perf_counter() - t0
            cost += out.scoring_seconds + out.compensation_seconds
            if a.trace:
                for u in out.applied:
                    print(f"    {u['unit']:<34} {u['kind']:<10} {u['params_removed']:>10,d}  {u['reduction']:6.1%}"
                          f"  score {u['score']:.4g}", flush=True)
        name = f"{sched} ({score}{f', top {top}' if top else ''}{f', compensated top {comp_top}' if comp_top else ''}{f', windows to {windows}' if windows else ''}{', in-sample trials' if in_sample else ''}{', outsiders screened' if screen else ''})"
        table.append((gran, name, "yes" if comp else "no", got, cost, wall))
        if sparse:
            table.append((gran, name + f" + STADE 50 % at {a.stade_level:.0%}", "yes" if comp else "no", sparse,
                          cost, wall))
        print(f"{cfg}: " + "  ".join(f"{lv:.0%}: {got[lv][1]:8.2f} (at {got[lv][0]:.1%})" for lv in levels if lv in got)
              + f"  | scoring+compensation {cost:.0f} s = {cost / dense:.1f} dense fwds; wall {wall:.0f} s; "
                f"taylor channel pass {out.channel_seconds:.0f} s", flush=True)
    if kept:
        speed = lm_speed({"dense": base.model, **kept}, base.model.config.vocab_size,
                         SpeedSettings(prefill=(), decode_tokens=32, repeats=5), progress=False)
        d = 1 / speed["dense"]["decode_tokens_per_s"]
        print(f"\ndecode latency, {torch.get_num_threads()} thread(s), interleaved: dense {1000 * d:.2f} ms/token")
        for name, row in speed.items():
            if name != "dense":
                t = 1 / row["decode_tokens_per_s"]
                print(f"  {name}: {1000 * t:.2f} ms/token ({1 - t / d:.1%} lower)")
    print(f"\nperplexity on {' / '.join(texts)} ({a.eval_windows} windows of 256 tokens each); calibration "
          f"{a.calib_samples} x {a.seq_len} tokens of shakespeare:calib; cost = scoring + compensation seconds / "
          f"one dense forward over the calibration set ({dense:.1f} s)\n")
    print("| granularity | schedule | compensation | " + " | ".join(f"ppl @{lv:.0%}" for lv in levels)
          + " | cost (dense fwds) | wall (s) |")
    print("|---|---|---|" + "---|" * (len(levels) + 2))
    print("| dense | - | - | " + " | ".join(" / ".join(f"{v:.2f}" for v in dense_ppl) for _ in levels) + " | - | - |")
    for gran, name, comp, got, cost, wall in table:
        cells = [" / ".join(f"{v:.2f}" for v in got[lv][1:]) + f" ({got[lv][0]:.1%})" if lv in got else "-"
                 for lv in levels]
        print(f"| {gran} | {name} | {comp} | " + " | ".join(cells) + f" | {cost / dense:.1f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
