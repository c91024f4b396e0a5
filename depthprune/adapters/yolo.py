"""Ultralytics YOLO detection models (built from a model `.yaml`, or a trusted `.pt`)."""
from __future__ import annotations

import os
import tempfile

import torch

from ..errors import SpecError
from .base import LoadedModel
from .hf import load_recipe


def _quiet_settings() -> None:
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "depthprune-yolo"))
    os.environ.setdefault("YOLO_VERBOSE", "False")


def _detections(model, inputs):
    """The inference output only; the auxiliary raw feature maps also returned in eval mode
    are not fixed-width model outputs."""
    out = model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def load_yolo(spec: str, trust_checkpoint: bool = False, imgsz: int = 640) -> LoadedModel:
    _quiet_settings()
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        raise SpecError("ultralytics models need the 'ultralytics' extra: pip install 'depthprune[ultralytics]'") from None
    if spec.endswith((".yaml", ".yml")):
        try:
            model = DetectionModel(spec, verbose=False)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise SpecError(f"cannot build ultralytics model {spec!r}: {e}") from None
    else:
        if not os.path.isfile(spec):
            raise SpecError(f"no such checkpoint: {spec}")
        if not trust_checkpoint:
            raise SpecError(f"{spec} is a pickled ultralytics checkpoint; pass --trust-checkpoint "
                            "only if you trust its source")
        from ultralytics.nn.tasks import load_checkpoint
        model, _ = load_checkpoint(spec)
        model = model.float()
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, imgsz, imgsz, generator=g)
    return LoadedModel(model=model, example_inputs=(x,), spec=spec, family="yolo", forward_fn=_detections,
                       recipe=load_recipe("yolov5"))
