"""Evaluation of ultralytics detectors: parameters, GFLOPs, latency, and mAP through ultralytics'
own validator."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from ..adapters.yolo import ultralytics_env
from ..depth.engine import count_params
from ..errors import UserError
from .speed import module_speed, threads

LATENCY_IMGSZ = 640


def gflops(model: nn.Module, imgsz: int) -> float:
    """GFLOPs of one ``imgsz`` x ``imgsz`` image (ultralytics' counter)."""
    ultralytics_env()
    from ultralytics.utils.torch_utils import get_flops
    return float(get_flops(model, imgsz))


def latency_entry(models: dict[str, nn.Module], forward: Callable, imgsz: int = LATENCY_IMGSZ,
                  repeats: int = 5) -> dict:
    """Median seconds per image (batch 1, ``imgsz``), models measured interleaved."""
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    res = module_speed(models, (x,), forward, repeats=repeats)
    out = {"imgsz": imgsz, "batch": 1, "threads": threads(), "repeats": repeats,
           **{f"{k}_s": v for k, v in res.items()}}
    if "dense" in res:
        out["speedup"] = res["dense"] / res["pruned"]
    return out


def validate_detector(model: nn.Module, data: str, imgsz: int, batch: int = 16, split: str = "val",
                      device: str = "cpu") -> dict[str, float]:
    """mAP50, mAP50-95, precision and recall of ``model`` (an ultralytics ``DetectionModel``, pruned
    or not) on the ``split`` images of dataset YAML ``data`` at ``imgsz`` pixels, computed by
    ultralytics' ``DetectionValidator``. The validator fuses Conv+BN and freezes the model it gets,
    so it gets a copy: ``model`` is left as it was."""
    ultralytics_env()
    from ultralytics.models.yolo.detect import DetectionValidator
    args = dict(data=data, imgsz=imgsz, batch=batch, split=split, device=device, plots=False, verbose=False,
                save_json=False)
    try:
        stats = DetectionValidator(args=args)(model=copy.deepcopy(model).eval())
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise UserError(f"cannot validate on {data}: {e}") from None
    return {"data": data, "imgsz": imgsz, "mAP50": float(stats["metrics/mAP50(B)"]),
            "mAP50-95": float(stats["metrics/mAP50-95(B)"]), "precision": float(stats["metrics/precision(B)"]),
            "recall": float(stats["metrics/recall(B)"])}


def detection_entry(model: nn.Module, forward: Callable, imgsz: int, dense: nn.Module | None = None,
                    data: str | None = None, speed: bool = True) -> dict:
    out: dict = {"params": count_params(model), "gflops": gflops(model, imgsz), "imgsz": imgsz}
    if dense is not None:
        out["dense_params"] = count_params(dense)
        out["reduction"] = 1 - out["params"] / out["dense_params"]
        out["dense_gflops"] = gflops(dense, imgsz)
    if speed:
        out["latency"] = latency_entry({"pruned": model, **({"dense": dense} if dense is not None else {})}, forward)
    if data is not None:
        out["map"] = validate_detector(model, data, imgsz)
    return out
