"""The trained detector pruned to 0-50 % fewer parameters (or FLOPs: ``--budget flops``), four ways, in one run.

Starts from the shipped detector (`yolov5n-synth`, YOLOv5n trained on the synthetic shapes set),
and at equal parameter reduction compares:

- ``full``: Algorithm 9 (iterative schedule: re-score after every prune) with Taylor scores from
  ultralytics' detection loss on labelled train images, over every candidate unit;
- ``reduced``: the same over the thesis's reduced search space (Table 4.4): only the
  channel-preserving convs (input width == output width on the dense model), so no width
  reconciliation is ever needed;
- ``width``: torch-pruning's own width pruning of the same model (DepGraph groups, group L2
  magnitude importance, the same ratio for every layer, `Detect` excluded), the ratio searched
  so the parameter count lands closest above the target;
- ``random``: Algorithm 9's loop with a random order (thesis Table 4.5), full search space.

Every depth-pruned level is its own run from the dense model, as ``prune --target LEVEL`` would do
(``--continue-levels``: from the previous level's model instead, Algorithm 9 continued with the
target raised; cheaper, but each level's last unit, chosen to land close to that level, then
stays in every later level). Every model is validated with ultralytics'
validator on the val split; latency is the median of interleaved runs of every model (batch 1,
the training size, after ultralytics' Conv+BN fusion, threads stated in the output).

    nice -n 10 python bench/yolo.py [--levels 0,0.1,0.2,0.3,0.4,0.5] [--configs full,reduced,width,random]
        [--train-images 64] [--val-images 150] [--threads 1] [--data-dir DIR] [--plot yolo.png]
        [--bn-recalib] [--json rows.json] [--save DIR] [--tiny]

Without --data-dir the dataset the detector was trained on (its meta.json: seed 0, 600 train /
150 val images at 320 px) is made in a temporary directory; with --data-dir it is made there
unless a ``data.yaml`` is already there. ``--tiny``: 8 train / 8 val images, levels 0 and 0.1,
two latency repeats (the CI check).

``--budget flops``: the levels count FLOPs of one image at the training size (depthprune's counter,
`prune --budget flops`) instead of parameters, for every config: depth pruning ranks units by
importance lost per FLOP, and the width ratio is searched on FLOPs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import tempfile
import time

import torch

from depthprune.adapters.load import load_model
from depthprune.adapters.yolo_train import RECOVERY_LR0, finetune_detector
from depthprune.data import make_synth_detect
from depthprune.depth import DepthPruner, count_params
from depthprune.eval.detect import gflops, validate_detector
from depthprune.eval.speed import module_speed, threads
from depthprune.importance import PruneConfig, TaylorScorer, make_budget, prune_to_target

CONFIGS = ("full", "reduced", "width", "random")
SCORES = {"full": "taylor", "reduced": "taylor", "random": "random"}
LEVELS = "0,0.1,0.2,0.3,0.4,0.5"
#: dataset of the shipped detector when its metadata does not say (bench/train_detector.py's DATA)
DEFAULT_DATASET = dict(seed=0, train=600, val=150, imgsz=320, classes=4)


def subset_yaml(data_yaml: str, split: str, n: int, out: str, as_split: str = "val") -> str:
    """A dataset YAML at ``out`` whose ``as_split`` (and ``train``) is the first ``n`` images of
    ``split`` of ``data_yaml`` (sorted by name), listed in a text file next to it."""
    import yaml
    root = os.path.dirname(os.path.abspath(data_yaml))
    with open(data_yaml) as f:
        info = yaml.safe_load(f)
    d = os.path.join(root, info[split])
    files = sorted(os.path.join(d, f) for f in os.listdir(d))[:n]
    listing = os.path.splitext(out)[0] + ".txt"
    with open(listing, "w") as f:
        f.write("\n".join(files) + "\n")
    with open(out, "w") as f:
        yaml.safe_dump({"train": listing, "val": listing, "names": info["names"]}, f)
    return out


def width_prune(model: torch.nn.Module, example: tuple, forward, target: float,
                steps: int = 16, cost=count_params) -> tuple[torch.nn.Module, int]:
    """torch-pruning's width pruning of ``model`` (not changed) to at least ``target`` parameter
    reduction: the same channel ratio in every layer group outside ``Detect``, chosen by
    bisection so the reduction lands as close above the target as the ratio allows. Returns the
    pruned copy and the parameters of its last move: what the smallest ratio step that crosses
    the target removes (one "unit" of uniform width pruning; layers of equal width move together).
    ``cost(model)``: what the target counts (parameters by default)."""
    import torch_pruning as tp
    dense = cost(model)

    def pruned(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model).eval()
        for p in m.parameters():
            p.requires_grad_(True)
        pr = tp.pruner.BasePruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[m.model[-1]], forward_fn=forward)
        pr.step()
        m.eval()
        return m

    lo, hi, best, below = 0.0, 1.0, None, dense
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = pruned(mid)
        n = cost(m)
        if 1 - n / dense >= target:
            hi = mid
            if best is None or n > best[0]:
                best = (n, m)
        else:
            lo, below = mid, n
    if best is None:
        raise RuntimeError(f"torch-pruning cannot reach {target:.1%} reduction")
    for p in best[1].parameters():
        p.requires_grad_(False)
    return best[1], below - best[0]


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, batches: list[dict]) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` (their ``img``,
    N x 3 x H x W in [0, 1]): a cumulative average over the batches, nothing else trained. The
    rest of the model stays in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momentum = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for b in batches:
            model(b["img"])
    finally:
        for m, mo in zip(bns, momentum):
            m.momentum = mo
            m.eval()


def channel_preserving(pruner: DepthPruner) -> set[str]:
    """Candidate units whose input and output widths are equal (thesis Table 4.4's reduced space)."""
    return {c.unit for c in pruner.candidates(with_params=False)
            if c.candidate and c.in_width and c.in_width == c.out_width}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov5n-synth", help="detector spec (default: the shipped detector)")
    ap.add_argument("--levels", default=LEVELS, help=f"parameter reductions (default {LEVELS})")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--train-images", type=int, default=64, help="labelled train images for Taylor (default 64)")
    ap.add_argument("--val-images", type=int, default=150, help="val images validated (default 150: all)")
    ap.add_argument("--batch", type=int, default=8, help="images per Taylor gradient batch")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=15, help="latency runs per model, interleaved (default 15)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random order")
    ap.add_argument("--bn-recalib", action="store_true",
                    help="re-estimate BatchNorm statistics of every pruned model on the Taylor train images before "
                         "validating (no training; the dense model keeps its own)")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="also fine-tune every pruned model this many epochs on the whole train split with "
                         "ultralytics' trainer (rows CONFIG+ft; the last epoch's EMA, val never used to select)")
    ap.add_argument("--finetune-levels", default="0.3",
                    help="levels whose pruned models --finetune-epochs trains (default 0.3; 'all')")
    ap.add_argument("--continue-levels", action="store_true",
                    help="prune each level from the previous level's model (one greedy run) instead of the dense one")
    ap.add_argument("--finetune-lr", type=float, default=RECOVERY_LR0,
                    help=f"fine-tuning lr0 (AdamW; default {RECOVERY_LR0})")
    ap.add_argument("--data-dir", help="where the synthetic dataset is (made there when absent)")
    ap.add_argument("--plot", help="write the mAP/latency-vs-reduction plot here (.png or .svg)")
    ap.add_argument("--json", help="write the table rows here as JSON")
    ap.add_argument("--save", help="directory: write each model's parameters as CONFIG-LEVEL.safetensors")
    ap.add_argument("--tiny", action="store_true", help="8 train / 8 val images, levels 0 and 0.1 (CI)")
    ap.add_argument("--budget", choices=("params", "flops"), default="params",
                    help="what the levels count (prune --budget; default params)")
    a = ap.parse_args()
    if a.tiny:
        a.levels, a.train_images, a.val_images, a.repeats = "0,0.1", 8, 8, 3
        a.finetune_levels = "0.1"
    levels = sorted({float(x) for x in a.levels.split(",")})
    configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {', '.join(bad)}; use {', '.join(CONFIGS)}")
    torch.set_num_threads(a.threads)
    from depthprune.adapters.yolo import ultralytics_env
    ultralytics_env()  # offline, settings private to the user
    from ultralytics.utils import LOGGER
    LOGGER.setLevel(logging.ERROR)
    t_start = time.perf_counter()

    base = load_model(a.model)
    imgsz = int(base.example_inputs[0].shape[-1])
    meta_ds = dict(DEFAULT_DATASET)
    from depthprune.adapters.yolo_weights import PACKAGED_DETECTORS
    if a.model in PACKAGED_DETECTORS:
        with open(os.path.join(PACKAGED_DETECTORS[a.model], "meta.json")) as f:
            meta_ds.update({k: v for k, v in json.load(f).get("dataset", {}).items() if k in DEFAULT_DATASET})
    if a.tiny:
        meta_ds.update(train=a.train_images, val=a.val_images)
    tmp = tempfile.TemporaryDirectory(prefix="bench-yolo-")
    data_dir = a.data_dir or os.path.join(tmp.name, "data")
    data_yaml = os.path.join(data_dir, "data.yaml")
    if not os.path.isfile(data_yaml):
        make_synth_detect(data_dir, **meta_ds)
    cal_yaml = subset_yaml(data_yaml, "train", a.train_images, os.path.join(tmp.name, "taylor.yaml"))
    val_yaml = subset_yaml(data_yaml, "val", a.val_images, os.path.join(tmp.name, "val.yaml"))
    t_data = time.perf_counter() - t_start
    print(f"{a.model} at {imgsz} px; dataset {data_yaml} ({meta_ds}); Taylor on the first {a.train_images} train "
          f"images, validation on the first {a.val_images} val images; {threads()} thread(s)", flush=True)

    batches = base.labelled_batches(base, cal_yaml, a.train_images, a.batch)
    cost = count_params if a.budget == "params" else make_budget(a.budget, base, batches).measure
    dense = cost(base.model)
    models: dict[tuple[str, float], torch.nn.Module] = {("dense", 0.0): base.model}
    # per model: units pruned so far, seconds, parameters the last unit (move) removed
    log: dict[tuple[str, float], dict] = {("dense", 0.0): {"units": 0, "seconds": 0.0, "last_unit_params": 0}}
    for cfg in configs:
        t_cfg = time.perf_counter()
        if cfg == "width":
            for lvl in levels:
                if lvl == 0:
                    continue
                t0 = time.perf_counter()
                models[(cfg, lvl)], last = width_prune(base.model, base.example_inputs, base.forward_fn, lvl,
                                                       cost=cost)
                log[(cfg, lvl)] = {"units": None, "seconds": time.perf_counter() - t0, "last_unit_params": last}
                print(f"  {cfg} @{lvl:.0%}: {1 - cost(models[(cfg, lvl)]) / dense:.2%} "
                      f"({time.perf_counter() - t_start:.0f} s)", flush=True)
            continue
        keep = None
        for lvl in levels:
            if lvl == 0:
                continue
            t0 = time.perf_counter()
            # every level is its own run from the dense model, as `prune --target LEVEL` would do
            # (--continue-levels: the previous level's model, the same greedy run with the target raised)
            if not a.continue_levels or lvl == min(x for x in levels if x > 0):
                lm = load_model(a.model)
                lm = dataclasses.replace(lm, loss_fn=lm.labelled_loss_fn)
                pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe,
                                     on_change=lm.on_change)
                if cfg == "reduced" and keep is None:
                    keep = channel_preserving(pruner)
                units, last, names = 0, 0, []
            rel = 1 - (1 - lvl) * dense / cost(lm.model)  # this level's target from the current model
            if rel > 0:
                config = PruneConfig(rel, SCORES[cfg], "iterative", "fine", seed=a.seed, compensate=False,
                                     budget=a.budget)
                _, out = prune_to_target(lm, config, batches, pruner=pruner, progress=False,
                                         only=(lambda g: set(g.units) <= keep) if keep is not None else None)
                units += len(out.applied)
                last = out.applied[-1]["params_removed"] if out.applied else last  # parameters, whatever the budget
                names += [u["unit"] for u in out.applied]
                # a continued level builds its own Taylor scorer; stop updating this one
                pruner.companions[:] = [c for c in pruner.companions if not isinstance(c, TaylorScorer)]
            models[(cfg, lvl)] = copy.deepcopy(lm.model)
            log[(cfg, lvl)] = {"units": units, "seconds": time.perf_counter() - t0, "last_unit_params": last,
                               "pruned": list(names)}
            print(f"  {cfg} @{lvl:.0%}: {1 - cost(lm.model) / dense:.2%} fewer {a.budget}, {units} units "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        if keep is not None:
            print(f"  reduced search space: {len(keep)} channel-preserving units", flush=True)
        print(f"{cfg}: pruned in {time.perf_counter() - t_cfg:.0f} s", flush=True)
    t_prune = time.perf_counter() - t_start - t_data

    t0 = time.perf_counter()
    if a.bn_recalib:
        for key, m in models.items():
            if key[0] != "dense":  # the reference keeps the statistics it was trained with
                recalibrate_bn(m, batches)
    t_ft = 0.0
    if a.finetune_epochs:
        t1 = time.perf_counter()
        ft_levels = None if a.finetune_levels == "all" else {float(x) for x in a.finetune_levels.split(",")}
        for (cfg, lvl), m in list(models.items()):
            if cfg == "dense" or (ft_levels is not None and lvl not in ft_levels):
                continue
            ft, info = finetune_detector(m, data_yaml, imgsz, a.finetune_epochs, os.path.join(tmp.name, "ft"),
                                         lr0=a.finetune_lr)
            models[(cfg + "+ft", lvl)] = ft
            log[(cfg + "+ft", lvl)] = {**log[(cfg, lvl)], "finetune_seconds": info["seconds"]}
            print(f"  fine-tuned {cfg} @{lvl:.0%}: {a.finetune_epochs} epochs in {info['seconds']:.0f} s "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        configs = [c for cfg in configs for c in (cfg, cfg + "+ft")]
        t_ft = time.perf_counter() - t1
    rows = []
    for (cfg, lvl), m in models.items():
        v = validate_detector(m, val_yaml, imgsz)
        p, c = count_params(m), cost(m)
        rows.append({"config": cfg, "target": lvl, "params": p, "reduction": 1 - p / count_params(base.model),
                     "budget": a.budget, "budget_reduction": 1 - c / dense, "reached": 1 - c / dense >= lvl - 1e-9,
                     "gflops": gflops(m, imgsz), "mAP50": v["mAP50"], "mAP50-95": v["mAP50-95"], **log[(cfg, lvl)]})
        print(f"  validated {cfg} @{lvl:.0%}: mAP50-95 {v['mAP50-95']:.4f} ({time.perf_counter() - t_start:.0f} s)",
              flush=True)
    t_val = time.perf_counter() - t0 - t_ft  # BatchNorm re-estimation included, fine-tuning not
    t0 = time.perf_counter()
    fused = {}
    for key, m in models.items():
        f = copy.deepcopy(m).eval()
        f.fuse(verbose=False)
        fused[f"{key[0]}@{key[1]}"] = f
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    lat = module_speed(fused, (x,), base.forward_fn, repeats=a.repeats, warmup=1)
    t_lat = time.perf_counter() - t0
    d_map = rows[0]["mAP50-95"]
    d_lat = lat["dense@0.0"]
    for r in rows:
        r["latency_ms"] = 1000 * lat[f"{r['config']}@{r['target']}"]
        r["speedup"] = d_lat * 1000 / r["latency_ms"]
        r["kept"] = r["mAP50-95"] / d_map if d_map > 0 else float("nan")

    print(f"\n{a.model}, {imgsz} px; mAP by ultralytics' validator on {a.val_images} val images; latency: batch 1, "
          f"{imgsz} px, fused Conv+BN, CPU, {threads()} thread(s), median of {a.repeats} interleaved runs after 1 "
          f"warm-up; kept = mAP50-95 / dense mAP50-95; \"not reached\": the search space has no unit left"
          + (f"; pruned models' BatchNorm statistics re-estimated on the {a.train_images} train images" if a.bn_recalib else "")
          + (f"; +ft: fine-tuned {a.finetune_epochs} epochs on all train images (ultralytics trainer, AdamW lr0 "
             f"{a.finetune_lr:g}, no warm-up, last-epoch EMA)" if a.finetune_epochs else "")
          + "\n")
    what = "" if a.budget == "params" else f" | {a.budget} reduction"
    print(f"| config | target{'' if a.budget == 'params' else f' ({a.budget})'} | params | reduction{what} | GFLOPs | latency (ms) | speed-up | mAP50 | mAP50-95 | kept |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if what else ""))
    order = {c: i for i, c in enumerate(("dense",) + tuple(configs))}
    rows.sort(key=lambda r: (order[r["config"]], r["target"]))
    for r in rows:
        short = "" if r["reached"] else " (not reached)"
        extra = "" if a.budget == "params" else f" | {r['budget_reduction']:.2%}"
        print(f"| {r['config']} | {r['target']:.0%} | {r['params']:,d} | {r['reduction']:.2%}{short}{extra} | {r['gflops']:.2f} | "
              f"{r['latency_ms']:.1f} | {r['speedup']:.2f} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | "
              f"{r['kept']:.1%} |")
    total = time.perf_counter() - t_start
    print(f"\nwall time {total:.0f} s (dataset {t_data:.0f} s, pruning {t_prune:.0f} s, fine-tuning {t_ft:.0f} s, "
          f"validation {t_val:.0f} s, "
          f"latency {t_lat:.0f} s)")

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "imgsz": imgsz, "bn_recalib": a.bn_recalib, "finetune_epochs": a.finetune_epochs,
                       "finetune_levels": a.finetune_levels, "continue_levels": a.continue_levels,
                       "threads": threads(), "repeats": a.repeats,
                       "train_images": a.train_images, "val_images": a.val_images,
                       "dense_params": count_params(base.model), "budget": a.budget, "dense_cost": dense,
                       "rows": rows, "wall_seconds": total}, f, indent=1)
    if a.save:
        from safetensors.torch import save_file
        os.makedirs(a.save, exist_ok=True)
        for (cfg, lvl), m in models.items():
            params = {n: p.detach().contiguous() for n, p in m.named_parameters()}
            save_file(params, os.path.join(a.save, f"{cfg}-{lvl:g}.safetensors"))
    if a.plot:
        from depthprune.viz.curves import Point, plot_curves
        series = {}
        for cfg in configs:
            pts = [r for r in rows if r["config"] in (cfg, "dense")]
            series[cfg] = [Point(r["reduction"], {"mAP50-95": r["mAP50-95"], "mAP50": r["mAP50"]}, r["latency_ms"])
                           for r in pts]
        plot_curves(series, a.plot, title=f"{a.model}: pruned at equal parameter reduction")
        print(f"wrote {a.plot}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
