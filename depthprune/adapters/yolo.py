"""Ultralytics YOLO detection models (built from a model `.yaml`, or a trusted `.pt`).

Two things are settled here before ultralytics is first imported (`ultralytics_env`): it stays
offline (``YOLO_OFFLINE``: no DNS look-up at import, no telemetry, no font download) and keeps its
settings in a directory private to the user. And every model YAML handed to ultralytics goes
through one gate (`detection_model`): ultralytics evaluates a YAML's ``activation:`` text as
Python and calls whatever its layer names resolve to, so only plain ``torch.nn`` activations and
known layer classes pass without ``trust_code`` (the CLI's ``--trust-code``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..depth.identity import PrunedModule
from ..errors import SpecError, UserError, one_line
from .base import Family, LoadedModel
from .recipes import load_recipe
from .yolo_build import (check_model_yaml, detection_model, is_safe_activation, short_repr,  # noqa: F401 (public here)
                         ultralytics_env, yolo_config_dir)
from .yolo_weights import PACKAGED_DETECTORS, is_detector_dir, load_detector


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
    ultralytics_env()
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
    ultralytics_env()
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
    ultralytics_env()
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


def build(desc: dict, directory: Path, trust_code: bool = False, empty: bool = True) -> LoadedModel:
    """An ultralytics detection model built from the described YAML (random weights); its YAML
    goes through `check_model_yaml` (``trust_code`` lets code in it run); ``empty`` is not used
    (a detector is small)."""
    spec = str(directory)
    imgsz = desc.get("imgsz", 640)
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or not 32 <= imgsz <= 8192:
        raise SpecError(f"{spec}: the described input size {short_repr(imgsz)} is not a whole number of pixels "
                        "from 32 to 8192")
    model = detection_model(desc.get("yaml"), f"{spec} (base model YAML)", trust_code)
    return _wrap(_prepare(model), spec, imgsz)


def _wrap(model, spec: str, imgsz: int) -> LoadedModel:
    return LoadedModel(model=model, example_inputs=_example_inputs(imgsz), spec=spec, adapter=YOLO,
                       forward_fn=_detections,
                       recipe=load_recipe("yolov5"), loss_fn=output_energy_loss,
                       labelled_batches=detection_batches, labelled_loss_fn=detection_loss)


def trainable_as_built(model: torch.nn.Module) -> None:
    """Give every parameter the ``requires_grad`` a freshly built ultralytics model has: all
    trainable but the DFL's fixed projection conv. Trained checkpoints store the EMA copy with
    every flag False, which would otherwise read as "frozen" to the engine and to Taylor."""
    ultralytics_env()
    from ultralytics.nn.modules.block import DFL
    fixed = {id(p) for m in model.modules() if isinstance(m, DFL) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in fixed)


def fuse_stand_ins(model: torch.nn.Module) -> list[str]:
    """Put each ultralytics ``Conv`` block whose conv or BatchNorm was pruned into the form that
    ``fuse()`` gives a block: ``act(conv(x))`` with no ``bn`` attribute (exact in eval mode).

    Ultralytics' fuse folds ``bn`` into ``conv`` for every ``Conv`` that still has a ``bn``, and
    needs both to be real layers. A pruned block has a parameter-free stand-in in one or both
    places. Its new ``conv`` is ``bn`` after ``conv`` with identity stand-ins left out and a live
    BatchNorm written as the equivalent 1x1 depthwise convolution (per-channel scale and shift):
    with the BatchNorm pruned (or already folded) the conv stays as it is; with only the conv
    pruned, the BatchNorm's convolution takes its place. Blocks with both layers live are left
    for ultralytics to fuse. Returns the paths of the blocks put in fused form; `UserError` for
    block types whose fusion cannot skip a stand-in (``Conv2``, ``RepConv`` with pruned parts)."""
    ultralytics_env()
    from ultralytics.nn.modules.conv import Conv, Conv2, RepConv
    done = []
    for path, m in model.named_modules():
        if isinstance(m, RepConv) and any(isinstance(c, PrunedModule) for c in m.modules()):
            raise UserError(f"{path}: a RepConv with pruned parts cannot be fused")
        if not isinstance(m, Conv) or not hasattr(m, "bn"):
            continue
        if not (isinstance(m.conv, PrunedModule) or isinstance(m.bn, PrunedModule)):
            continue
        if isinstance(m, Conv2):
            raise UserError(f"{path}: a Conv2 with pruned parts cannot be fused")
        parts = [m.conv, m.bn if isinstance(m.bn, PrunedModule) else _batchnorm_as_conv(m.bn)]
        parts = [p for p in parts if not (isinstance(p, PrunedModule) and p.state == "identity")]
        if parts:
            m.conv = parts[0] if len(parts) == 1 else torch.nn.Sequential(*parts)
        delattr(m, "bn")
        m.forward = m.forward_fuse
        done.append(path)
    return done


@torch.no_grad()
def _batchnorm_as_conv(bn: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
    """The eval-mode BatchNorm as a 1x1 depthwise convolution with bias."""
    c = bn.num_features
    scale = (bn.weight if bn.affine else torch.ones(c)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros(c)) - bn.running_mean * scale
    conv = torch.nn.Conv2d(c, c, 1, groups=c, bias=True).to(bn.running_var)
    conv.weight.copy_(scale.reshape(c, 1, 1, 1))
    conv.bias.copy_(shift)
    return conv.requires_grad_(False)


class FuseWithStandIns:
    """``model.fuse`` of a model loaded here: `fuse_stand_ins`, then the class's own ``fuse``.
    A plain object holding the model (not a bound method), so the model still pickles and copies."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        fuse_stand_ins(self.model)
        return type(self.model).fuse(self.model, *args, **kwargs)


def _prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, construction-time ``requires_grad``, and a ``fuse()`` that accepts stand-ins
    (ultralytics' validator and exporter call ``model.fuse()``)."""
    trainable_as_built(model)
    model.fuse = FuseWithStandIns(model)
    return model.eval()


def _example_inputs(imgsz: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, imgsz, imgsz, generator=g),)


def _train_imgsz(train_args: dict | None) -> int | None:
    v = (train_args or {}).get("imgsz")
    if isinstance(v, (list, tuple)) and v:
        v = max(v)
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


def load_yolo(spec: str, trust_checkpoint: bool = False, imgsz: int | None = None,
              trust_code: bool = False) -> LoadedModel:
    """An ultralytics model ``.yaml`` (random weights), a pickled ``.pt`` checkpoint (only with
    ``trust_checkpoint``), a packaged detector name (`PACKAGED_DETECTORS`) or a detector directory
    (`load_detector`). Example inputs are ``imgsz`` square: by default the checkpoint's training
    size when it records one, else 640. A model YAML that would run code is refused unless
    ``trust_code`` (`check_model_yaml`)."""
    ultralytics_env()
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        raise SpecError("ultralytics models need the 'ultralytics' extra: pip install 'depthprune[ultralytics]'") from None
    train_imgsz = None
    if spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        model, meta = load_detector(PACKAGED_DETECTORS.get(spec, spec), trust_code=trust_code)
        train_imgsz = _train_imgsz(meta)
    elif spec.endswith((".yaml", ".yml")):
        model = detection_model(spec, spec, trust_code)
    else:
        if not os.path.isfile(spec):
            raise SpecError(f"no such checkpoint: {spec}")
        if not trust_checkpoint:
            raise SpecError(f"{spec} is a pickled ultralytics checkpoint; pass --trust-checkpoint "
                            "only if you trust its source")
        from ultralytics.nn.tasks import load_checkpoint
        try:
            model, ckpt = load_checkpoint(spec)
        except Exception as e:  # a damaged or foreign checkpoint
            raise SpecError(f"cannot load checkpoint {spec!r}: {one_line(e)}") from None
        if not isinstance(model, DetectionModel):
            raise SpecError(f"{spec} holds a {type(model).__name__}, not an ultralytics detection model")
        model = model.float()
        train_imgsz = _train_imgsz(ckpt.get("train_args"))
    return _wrap(_prepare(model), spec, imgsz or train_imgsz or 640)



def _calibration(lm: LoadedModel, text_spec: str, samples: int, seq_len: int, batch_size: int) -> list:
    return calibration_images(samples, lm.example_inputs[0].shape[-1])


#: ultralytics detectors (images; labelled detection data for fine-tuning and evaluation)
YOLO = Family("yolo", "ultralytics", data="images", formats=("onnx",), describe=describe,
              calibration=_calibration)
