"""Conv->BN->act on YOLOv5n: what happens to the BN that follows a conv replaced by identity.

Three choices (recipe keys ``post_norm`` and ``fold_batchnorm``):

- ``unit`` (default): the BN is part of the conv's unit and goes with it: act(x);
- ``keep``: the BN stays (the thesis read literally, without removing the previous BN): act's
  FindAct still removes the activation, so the block computes BN(x);
- ``fold``: every BN is folded into its conv first (ultralytics ``fuse()``), then the conv goes.

For every candidate conv, prunes it alone under each choice (a trial, rolled back) and prints
the model's parameters, the mean parameters a prune removes, and the relative change of the
detections on the packaged sample images, ``||y - y_dense|| / ||y_dense||`` (mean, median, max).
Without a hub the model has random weights: BN statistics are first re-estimated on the sample
images so that each BN is a real per-channel affine map, not the identity of a fresh init.

    python bench/yolo_bn.py [--model yolov5n.yaml] [--units 0 (all)]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from depthprune.adapters.load import calibration, load_model
from depthprune.depth import DepthPruner, count_params
from depthprune.errors import UserError

CHOICES = {"unit": {"post_norm": "unit"}, "keep": {"post_norm": "keep"}, "fold": {"fold_batchnorm": True}}


@torch.no_grad()
def estimate_bn(model: nn.Module, images: list) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the images
    model.train()
    for x in images:
        model(*x)
    model.eval()


def run(lm, images: list, choice: str, limit: int) -> dict:
    recipe = dict(lm.recipe, **CHOICES[choice])
    base = DepthPruner(copy.deepcopy(lm.model), lm.example_inputs, lm.forward_fn, recipe=recipe)
    with torch.no_grad():
        dense = [lm.forward_fn(base.model, x) for x in images]
    cands = [c for c in base.candidates() if c.candidate]
    changes, removed, refused = [], [], 0
    for c in cands[:limit or None]:
        try:
            with base.trial([c.unit]) as steps, torch.no_grad():
                out = [lm.forward_fn(base.model, x) for x in images]
                removed.append(sum(s.params_removed for s in steps))
        except UserError:
            refused += 1
            continue
        changes.append(statistics.mean(float((o - d).norm() / d.norm()) for o, d in zip(out, dense)))
    return {"params": count_params(base.model), "candidates": len(cands), "measured": len(changes),
            "refused": refused, "removed_mean": statistics.mean(removed), "change_mean": statistics.mean(changes),
            "change_median": statistics.median(changes), "change_max": max(changes)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="yolov5n.yaml")
    ap.add_argument("--units", type=int, default=0, help="first N candidates measured (0: all)")
    ap.add_argument("--images", type=int, default=4)
    a = ap.parse_args()
    lm = load_model(a.model)
    images = calibration(lm, "", a.images, 0)
    estimate_bn(lm.model, images)
    print("| BN choice | model params | candidates | measured | mean params removed "
          "| rel. output change: mean | median | max | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for choice in CHOICES:
        t0 = time.perf_counter()
        r = run(lm, images, choice, a.units)
        print(f"| {choice} | {r['params']:,d} | {r['candidates']} | {r['measured']} | {r['removed_mean']:,.0f} "
              f"| {r['change_mean']:.4f} | {r['change_median']:.4f} | {r['change_max']:.4f} "
              f"| {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
