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


def output_energy_loss(model, batch) -> torch.Tensor:
    """Label-free Taylor fallback for detectors: half the mean squared detection output.

    Without labelled images there is no training loss; any loss that compares the model with
    its own dense predictions has zero gradient at the dense weights, so this measures how
    much each weight drives the outputs instead. A weak proxy: pass labelled data when you
    have it (not supported yet)."""
    out = _detections(model, batch)
    return 0.5 * out.float().pow(2).mean()


def calibration_images(n: int = 4, imgsz: int = 640) -> list[tuple[torch.Tensor]]:
    """Batches of one image each from the images ultralytics ships (bus, zidane), resized to
    ``imgsz`` square, with horizontal flips and crops for more than two."""
    from PIL import Image
    from ultralytics.utils import ASSETS
    files = sorted(p for p in ASSETS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SpecError("no sample images found in the ultralytics package")
    out = []
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB")
        k = i // len(files)
        if k % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if k >= 2:
            w, h = img.size
            img = img.crop((w // 8 * (k // 2 % 4), 0, w, h))
        img = img.resize((imgsz, imgsz))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(imgsz, imgsz, 3)
        out.append((x.permute(2, 0, 1).float().div(255).unsqueeze(0),))
    return out


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
                       recipe=load_recipe("yolov5"), loss_fn=output_energy_loss)
