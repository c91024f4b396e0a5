"""``--format onnx`` for ultralytics YOLO models, through ultralytics' own exporter.

The exporter fuses every ``Conv`` block's BatchNorm into its convolution (``model.fuse()``),
which needs a real ``conv`` and ``bn``. In a pruned model a block's ``conv`` and/or ``bn`` may be
stand-ins (the pruned conv and the BN of its unit, or a BN folded away by the recipe); such a
block is put in the fused form first (`adapters.yolo.fuse_stand_ins`), which computes the same
and which ``fuse()`` skips (it has no ``bn`` left). Ultralytics itself is not modified.
The written ``model.onnx`` is checked with onnxruntime when it is installed: the largest absolute
difference from the pruned PyTorch model on the example input is reported.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.yolo import fuse_stand_ins, ultralytics_env
from ..errors import UserError
from .result import ExportResult


@dataclass
class OnnxPlan:
    imgsz: list[int]


def plan_export(lm) -> OnnxPlan:
    model = lm.model
    if not (hasattr(model, "yaml") and hasattr(model, "stride") and hasattr(model, "fuse")):
        raise UserError("the onnx format goes through ultralytics' exporter and needs an ultralytics model")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("the onnx format needs the 'onnx' package: pip install 'depthprune[export]'") from None
    return OnnxPlan(list(lm.example_inputs[0].shape[-2:]))


def _max_delta(lm, onnx_path: Path) -> float | None:
    """Largest |ONNX - PyTorch| over the detection output on the example input; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = lm.example_inputs[0]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = lm.forward_fn(lm.model, (x,)) if lm.forward_fn else lm.model(x)
    want = want[0] if isinstance(want, (tuple, list)) else want
    if tuple(got.shape) != tuple(want.shape):
        raise RuntimeError(f"ONNX output shape {got.shape} differs from the model's {tuple(want.shape)}")
    return float((torch.from_numpy(got) - want.float()).abs().max())


def write_export(lm, plan: OnnxPlan, out: Path) -> ExportResult:
    ultralytics_env()  # offline, settings private to the user
    from ultralytics.engine.exporter import Exporter
    from ultralytics.nn.tasks import guess_model_task
    model = copy.deepcopy(lm.model).eval()
    if not getattr(model, "task", None):  # set by ultralytics' YOLO wrapper, absent on a bare model
        model.task = guess_model_task(model)
    fused = fuse_stand_ins(model)
    model.pt_path = str(out / "model.pt")  # the exporter names its output after this: out/model.onnx
    args = {"format": "onnx", "imgsz": plan.imgsz, "batch": 1, "dynamic": False, "simplify": False,
            "device": "cpu", "verbose": False}
    written = Path(Exporter(overrides=args)(model))
    if written != out / "model.onnx":
        os.replace(written, out / "model.onnx")
    notes = [f"ultralytics exporter, {len(fused)} Conv block(s) with stand-ins pre-fused"]
    delta = _max_delta(lm, out / "model.onnx")
    notes.append("onnxruntime not installed: outputs not checked" if delta is None else
                 f"onnxruntime output vs the pruned model on the example input: max |delta| = {delta:.3g}")
    params = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    return ExportResult(out, "onnx", sorted(p.name for p in out.iterdir()), notes, params, 0)
