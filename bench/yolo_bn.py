"""Conv->BN->act on YOLOv5n: BN as part of the pruned conv's unit (default) vs folding BN first.

For every candidate conv, prunes it alone under each choice and prints: candidates, parameters
the model has, parameters removed, and the relative change of the detections on the packaged
sample images (``||y - y_dense|| / ||y_dense||``), averaged over candidates.

    python bench/yolo_bn.py [--model yolov5n.yaml] [--units 20]
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from depthprune.adapters import calibration, load_model
from depthprune.depth import DepthPruner, count_params
from depthprune.errors import UserError


def run(lm, fold: bool, limit: int) -> dict:
    recipe = dict(lm.recipe, fold_batchnorm=fold)
    base = DepthPruner(copy.deepcopy(lm.model), lm.example_inputs, lm.forward_fn, recipe=recipe)
    images = calibration(lm, "", 2, 0)
    with torch.no_grad():
        dense = [lm.forward_fn(base.model, x) for x in images]
    cands = [c for c in base.candidates() if c.candidate][:limit]
    changes, removed = [], []
    for c in cands:
        try:
            with base.trial([c.unit]) as steps, torch.no_grad():
                out = [lm.forward_fn(base.model, x) for x in images]
                removed.append(sum(s.params_removed for s in steps))
        except UserError:
            continue
        changes.append(statistics.mean(float((o - d).norm() / d.norm()) for o, d in zip(out, dense)))
    return {"params": count_params(base.model), "candidates": len([c for c in base.candidates() if c.candidate]),
            "measured": len(changes), "removed_mean": statistics.mean(removed),
            "change_mean": statistics.mean(changes), "change_max": max(changes)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="yolov5n.yaml")
    ap.add_argument("--units", type=int, default=20, help="first N candidates measured")
    a = ap.parse_args()
    lm = load_model(a.model)
    print("| BN choice | model params | candidates | units measured | mean params removed | mean rel. output change | max |")
    print("|---|---|---|---|---|---|---|")
    for fold in (False, True):
        r = run(lm, fold, a.units)
        print(f"| {'fold first' if fold else 'part of the unit'} | {r['params']:,d} | {r['candidates']} | {r['measured']} "
              f"| {r['removed_mean']:,.0f} | {r['change_mean']:.4f} | {r['change_max']:.4f} |")


if __name__ == "__main__":
    main()
