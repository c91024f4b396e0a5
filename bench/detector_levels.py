"""Which detection levels (P3/P4/P5, strides 8/16/32) a detector actually uses on a dataset.

Prints, for the detector and dataset given: the validation mAP with every level, and with the
class scores of one level's anchors set to zero (that level's detections removed); and how many
anchors of each level score above 0.25 and 0.5 on the first val images. A level whose removal
leaves the mAP unchanged contributes nothing, and the layers only it uses are free to prune.

    python bench/detector_levels.py [--model yolov5n-synth] [--data DIR/data.yaml] [--images 64]

Without --data, the synthetic val split the packaged detector was trained with is made in a
temporary directory (seed 0, 150 images).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from depthprune.adapters.load import load_model
from depthprune.data import make_synth_detect
from depthprune.eval.detect import validate_detector


def level_slices(model: torch.nn.Module, imgsz: int) -> list[slice]:
    """Anchor index ranges of each level in the Detect output (row-major per level)."""
    out, start = [], 0
    for s in model.stride.tolist():
        n = (imgsz // int(s)) ** 2
        out.append(slice(start, start + n))
        start += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov5n-synth")
    ap.add_argument("--trust-checkpoint", action="store_true")
    ap.add_argument("--data", help="ultralytics dataset YAML (default: the synthetic val split, seed 0)")
    ap.add_argument("--images", type=int, default=64, help="val images for the anchor counts")
    args = ap.parse_args()
    from depthprune.adapters.yolo import ultralytics_env
    ultralytics_env()  # offline, settings private to the user
    from ultralytics.utils import LOGGER
    LOGGER.setLevel(logging.ERROR)
    torch.set_num_threads(2)
    lm = load_model(args.model, trust_checkpoint=args.trust_checkpoint)
    imgsz = lm.example_inputs[0].shape[-1]
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="levels-")
        data = make_synth_detect(os.path.join(tmp.name, "ds"), seed=0, train=1, val=150, imgsz=imgsz)
    levels = level_slices(lm.model, imgsz)
    names = [f"P{int(np.log2(s))}" for s in lm.model.stride.tolist()]
    detect = lm.model.model[-1]

    def drop(level: slice):
        def hook(module, inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            y[:, 4:, level] = 0
            return output
        return hook

    print(f"{args.model} on {data} at {imgsz} px")
    print(f"{'levels':<12} {'mAP50':>7} {'mAP50-95':>9}")
    m = validate_detector(lm.model, data, imgsz)
    print(f"{'all':<12} {m['mAP50']:>7.4f} {m['mAP50-95']:>9.4f}")
    for name, level in zip(names, levels):
        handle = detect.register_forward_hook(drop(level))
        try:
            m = validate_detector(lm.model, data, imgsz)
        finally:
            handle.remove()
        print(f"{'without ' + name:<12} {m['mAP50']:>7.4f} {m['mAP50-95']:>9.4f}")

    from ultralytics.data.utils import check_det_dataset
    files = sorted(glob.glob(os.path.join(check_det_dataset(data)["val"], "*")))[:args.images]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((imgsz, imgsz))))
                     .permute(2, 0, 1).float() / 255 for f in files])
    with torch.no_grad():
        y = lm.forward_fn(lm.model, (x,))
    conf = y[:, 4:].max(1).values
    print(f"\nanchors scoring above a threshold on {len(files)} val images")
    for name, level in zip(names, levels):
        c = conf[:, level]
        print(f"{name}: {c.shape[1]:>5} anchors/image  >0.25: {int((c > 0.25).sum()):>5}  >0.5: {int((c > 0.5).sum()):>5}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
