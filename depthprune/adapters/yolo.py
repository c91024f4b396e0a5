"""Ultralytics YOLO detection models (built from a model `.yaml`, or a trusted `.pt`)."""
from __future__ import annotations

import os
import tempfile

import torch

from ..errors import SpecError
from .base import LoadedModel
from .recipes import load_recipe


def _quiet_settings() -> None:
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "depthprune-yolo"))
    os.environ.setdefault("YOLO_VERBOSE", "False")


def _detections(model, inputs):
    """The inference output only; the auxiliary raw feature maps also returned in eval mode
    are not fixed-width model outputs. ``inputs``: ``(images,)`` or a labelled batch dict."""
    out = model(inputs["img"]) if isinstance(inputs, dict) else model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def output_energy_loss(model, batch) -> torch.Tensor:
    """Label-free Taylor fallback for detectors: half the mean squared detection output.

    Without labelled images there is no training loss; any loss that compares the model with
    its own dense predictions has zero gradient at the dense weights, so this measures how
    much each weight drives the outputs instead. A weak proxy: pass labelled data when you
    have it (``--data``, `detection_loss`)."""
    out = _detections(model, batch)
    return 0.5 * out.float().pow(2).mean()


def detection_loss(model, batch: dict) -> torch.Tensor:
    """The ultralytics training loss (box + classification + DFL, summed over the batch) on a
    labelled batch from `detection_batches`. Gains come from the checkpoint's training
    arguments when it has them, else ultralytics' defaults."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import IterableSimpleNamespace
    if not isinstance(getattr(model, "args", None), IterableSimpleNamespace):
        train_args = model.args if isinstance(getattr(model, "args", None), dict) else {}
        model.args = get_cfg(overrides={k: train_args[k] for k in ("box", "cls", "dfl") if k in train_args})
        model.criterion = None
    loss, _ = model.loss(batch)
    return loss.sum()


def detection_batches(lm: LoadedModel, data: str, samples: int, batch_size: int = 8) -> list[dict]:
    """Labelled calibration batches: the first ``samples`` images of an ultralytics dataset YAML
    (its ``val`` split, else ``train``), letterboxed to the model's input size without augmentation."""
    _quiet_settings()
    nc, imgsz = lm.model.model[-1].nc, lm.example_inputs[0].shape[-1]
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    if not os.path.isfile(data):
        raise SpecError(f"no such dataset YAML: {data}")
    try:
        info = check_det_dataset(data, autodownload=False)
    except Exception as e:  # ultralytics raises many kinds for a bad YAML or missing images
        raise SpecError(f"cannot use dataset {data}: {e}") from None
    if info["nc"] != nc:
        raise SpecError(f"dataset {data} has {info['nc']} classes, the model detects {nc}")
    split = info.get("val") or info.get("train")
    try:
        ds = build_yolo_dataset(get_cfg(overrides={"imgsz": imgsz, "task": "detect"}), split, batch_size, info,
                                mode="val", stride=32)
    except Exception as e:
        raise SpecError(f"cannot read images of {data}: {e}") from None
    n = min(samples, len(ds))
    batches = []
    for i in range(0, n, batch_size):
        b = ds.collate_fn([ds[j] for j in range(i, min(i + batch_size, n))])
        batches.append({"img": b["img"].float() / 255, "batch_idx": b["batch_idx"], "cls": b["cls"],
                        "bboxes": b["bboxes"]})
    return batches


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


def describe(lm: LoadedModel) -> dict:
    """The architecture of an ultralytics model as data: its model YAML and input size."""
    return {"kind": "ultralytics", "yaml": lm.model.yaml, "imgsz": int(lm.example_inputs[0].shape[-1])}


def build(desc: dict, spec: str) -> LoadedModel:
    """An ultralytics detection model built from the described YAML (random weights)."""
    _quiet_settings()
    from ultralytics.nn.tasks import DetectionModel
    try:
        model = DetectionModel(dict(desc["yaml"]), verbose=False)
    except (KeyError, ValueError, TypeError) as e:
        raise SpecError(f"{spec}: cannot rebuild the ultralytics model: {e}") from None
    return _wrap(model.eval(), spec, int(desc.get("imgsz", 640)))


def _wrap(model, spec: str, imgsz: int) -> LoadedModel:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, imgsz, imgsz, generator=g)
    return LoadedModel(model=model, example_inputs=(x,), spec=spec, family="yolo", forward_fn=_detections,
                       recipe=load_recipe("yolov5"), loss_fn=output_energy_loss,
                       labelled_batches=detection_batches, labelled_loss_fn=detection_loss)


def load_yolo(spec: str, trust_checkpoint: bool = False, imgsz: int = 640) -> LoadedModel:
    _quiet_settings()
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        raise SpecError("ultralytics models need the 'ultralytics' extra: pip install 'depthprune[ultralytics]'") from None
    from . import _one_line
    if spec.endswith((".yaml", ".yml")):
        try:
            model = DetectionModel(spec, verbose=False)
        except Exception as e:  # a user's YAML: ultralytics raises many kinds for a wrong one
            raise SpecError(f"cannot build ultralytics model {spec!r}: {_one_line(e)}") from None
    else:
        if not os.path.isfile(spec):
            raise SpecError(f"no such checkpoint: {spec}")
        if not trust_checkpoint:
            raise SpecError(f"{spec} is a pickled ultralytics checkpoint; pass --trust-checkpoint "
                            "only if you trust its source")
        from ultralytics.nn.tasks import load_checkpoint
        try:
            model, _ = load_checkpoint(spec)
        except Exception as e:  # a damaged or foreign checkpoint
            raise SpecError(f"cannot load checkpoint {spec!r}: {_one_line(e)}") from None
        if not isinstance(model, DetectionModel):
            raise SpecError(f"{spec} holds a {type(model).__name__}, not an ultralytics detection model")
        model = model.float()
    return _wrap(model.eval(), spec, imgsz)
