"""Detection quality through ultralytics' own validator."""
from __future__ import annotations

import copy

import torch


def validate_detector(model: torch.nn.Module, data: str, imgsz: int, batch: int = 16, split: str = "val",
                      device: str = "cpu") -> dict[str, float]:
    """mAP50, mAP50-95, precision and recall of ``model`` (an ultralytics ``DetectionModel``, pruned
    or not) on the ``split`` images of dataset YAML ``data`` at ``imgsz`` pixels, computed by
    ultralytics' ``DetectionValidator``. The validator fuses Conv+BN and freezes the model it gets,
    so it gets a copy: ``model`` is left as it was."""
    from ultralytics.models.yolo.detect import DetectionValidator
    args = dict(data=data, imgsz=imgsz, batch=batch, split=split, device=device, plots=False, verbose=False,
                save_json=False)
    stats = DetectionValidator(args=args)(model=copy.deepcopy(model).eval())
    return {"mAP50": float(stats["metrics/mAP50(B)"]), "mAP50-95": float(stats["metrics/mAP50-95(B)"]),
            "precision": float(stats["metrics/precision(B)"]), "recall": float(stats["metrics/recall(B)"])}
