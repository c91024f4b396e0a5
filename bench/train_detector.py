"""Make the synthetic shapes dataset and train the shipped detector (`yolov5n-synth`) on it.

Reproduces `depthprune/assets/yolov5n-synth/` from nothing: ultralytics' own trainer, YOLOv5n
(anchor-free "v5u" head) from scratch on CPU, then the best checkpoint stored as YAML + fp16
safetensors + meta.json (no pickle).

    nice -n 10 python bench/train_detector.py --work /tmp/yolov5n-synth-train \
        [--epochs 30 --seed 0 --ship depthprune/assets/yolov5n-synth]

Takes ~40-60 min on 2 CPU cores. Prints the dataset statistics, wall time and final val mAP.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

from depthprune.adapters.yolo_weights import PACKAGED_DETECTORS, save_detector
from depthprune.data import make_synth_detect

DATA = dict(seed=0, train=600, val=150, imgsz=320, classes=4)


def dataset_stats(data_dir: str, imgsz: int) -> dict:
    """Objects per image and box sizes (longer side, pixels) by the detection level they suit:
    P3 (< 64 px), P4 (64-128 px), P5 (>= 128 px)."""
    stats = {}
    for split in ("train", "val"):
        d = os.path.join(data_dir, "labels", split)
        per_image, sides = [], []
        for name in sorted(os.listdir(d)):
            rows = np.loadtxt(os.path.join(d, name), ndmin=2)
            per_image.append(len(rows))
            sides += list(rows[:, 3:5].max(1) * imgsz)
        sides = np.array(sides)
        stats[split] = {"images": len(per_image), "objects": int(sides.size),
                        "objects_per_image": round(float(np.mean(per_image)), 2),
                        "max_side_px": {"<16": int((sides < 16).sum()), "16-64 (P3)": int(((sides >= 16) & (sides < 64)).sum()),
                                        "64-128 (P4)": int(((sides >= 64) & (sides < 128)).sum()),
                                        ">=128 (P5)": int((sides >= 128).sum())}}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="working directory (dataset and ultralytics run)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the dataset seed is fixed: DATA)")
    ap.add_argument("--ship", default=str(PACKAGED_DETECTORS["yolov5n-synth"]),
                    help="where to write the trained detector (default: the packaged asset)")
    args = ap.parse_args()
    import torch
    from ultralytics import YOLO
    command = "python bench/train_detector.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    data_dir = os.path.join(os.path.abspath(args.work), "data")
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    data_yaml = make_synth_detect(data_dir, force=True, **DATA)
    print(f"dataset: {data_yaml} in {time.perf_counter() - t0:.1f} s")
    stats = dataset_stats(data_dir, DATA["imgsz"])
    print(stats)

    train_args = dict(data=data_yaml, imgsz=DATA["imgsz"], epochs=args.epochs, batch=16, workers=2, device="cpu",
                      seed=args.seed, deterministic=True, project=os.path.abspath(args.work), name="run",
                      exist_ok=True, plots=False, verbose=False)
    t0 = time.perf_counter()
    model = YOLO("yolov5n.yaml")
    model.train(**train_args)
    train_seconds = time.perf_counter() - t0

    best = os.path.join(os.path.abspath(args.work), "run", "weights", "best.pt")
    trained = YOLO(best)  # our own checkpoint, just written by the trainer
    metrics = trained.val(data=data_yaml, imgsz=DATA["imgsz"], batch=16, device="cpu", plots=False, verbose=False)
    net = trained.model.float().eval()
    saved_args = net.args if isinstance(net.args, dict) else vars(net.args)
    meta = {"name": "yolov5n-synth", "imgsz": DATA["imgsz"], "nc": len(net.names),
            "names": [net.names[i] for i in range(len(net.names))],
            "dataset": {"generator": "depthprune.data.make_synth_detect", **DATA},
            "dataset_stats": stats,
            "train_command": command,
            "ultralytics_train_args": {k: v for k, v in train_args.items() if k not in ("data", "project")},
            "train_args": {k: saved_args[k] for k in ("box", "cls", "dfl") if k in saved_args},
            "train_seconds": round(train_seconds, 1), "torch": torch.__version__,
            "ultralytics": __import__("ultralytics").__version__,
            "val": {"images": DATA["val"], "mAP50": round(float(metrics.box.map50), 4),
                    "mAP50-95": round(float(metrics.box.map), 4)}}
    save_detector(net, args.ship, meta)
    print(f"trained {args.epochs} epochs in {train_seconds / 60:.1f} min; val mAP50 {meta['val']['mAP50']:.4f} "
          f"mAP50-95 {meta['val']['mAP50-95']:.4f}; wrote {args.ship}")


if __name__ == "__main__":
    main()
