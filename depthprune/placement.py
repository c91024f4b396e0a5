"""Where a model runs and in which precision: ``--device`` and ``--dtype``.

A `Placement` is what the user asked for; `check` refuses a device that is not there (one line)
before anything is loaded; `place` puts a loaded model there: cast to the dtype asked for, then
on one device, or, for ``auto`` with GPUs, on the first GPU when it fits and spread over every
GPU (and the CPU) with accelerate's ``device_map="auto"`` when it does not. Nothing moves a model
off the devices it was put on afterwards: inputs follow the model (`to_device`, `input_device`).

Only this module knows device names; torch is imported when a placement is applied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import UserError

DEVICES_HELP = "cpu, cuda, cuda:N or auto (GPUs when there are any, else cpu)"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|auto|cuda|cuda:\d+|mps)$")


@dataclass(frozen=True)
class Placement:
    """``device``: cpu, cuda, cuda:N, auto; ``dtype``: auto (the checkpoint's own), float32,
    bfloat16, float16."""

    device: str = "cpu"
    dtype: str = "auto"

    def torch_dtype(self):
        """The `torch.dtype` asked for, None for ``auto``."""
        import torch
        return None if self.dtype == "auto" else getattr(torch, self.dtype)


DEFAULT = Placement()


def check(p: Placement) -> Placement:
    """Refuse a device name that is not one, or a device this machine does not have."""
    if p.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {p.dtype!r}")
    if not _DEVICE.match(p.device):
        raise UserError(f"--device must be {DEVICES_HELP}, got {p.device!r}")
    if p.device in ("cpu", "auto"):
        return p
    import torch
    if p.device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps: no Apple GPU (MPS) is available here; use --device cpu")
        return p
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise UserError(f"--device {p.device}: no CUDA GPU is available here (torch sees none); use --device cpu "
                        "or auto")
    index = int(p.device.split(":")[1]) if ":" in p.device else 0
    if index >= n:
        raise UserError(f"--device {p.device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    return p


def place(lm: Any, p: Placement) -> Any:
    """Put ``lm`` (a `LoadedModel`) where ``p`` says, in place; returns it. The dtype cast
    touches floating-point tensors only (a cast of a model already in that dtype is free)."""
    import torch
    model = lm.model
    dtype = p.torch_dtype()
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in model.parameters()):
        model.to(dtype)
    if dtype is not None and getattr(model, "config", None) is not None and hasattr(model.config, "dtype"):
        model.config.dtype = dtype  # what a Hugging Face config.json written from it says
    device = p.device
    if device == "auto":
        device = _auto_device(model)
    if device is not None and not getattr(model, "hf_device_map", None):
        model.to(torch.device(device))
    lm.example_inputs = to_device(lm.example_inputs, input_device(model))
    return lm


def _auto_device(model) -> str | None:
    """``auto``: the CPU without GPUs; the first GPU when the model fits in 90 % of its free
    memory; else the model is dispatched over every GPU and the CPU (accelerate) and None is
    returned (it is placed already)."""
    import torch
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "cpu"
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    free, _ = torch.cuda.mem_get_info(0)
    if size < 0.9 * free:
        return "cuda:0"
    from accelerate import dispatch_model, infer_auto_device_map
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    return None


def input_device(model) -> Any:
    """The device a model's inputs go to: its first parameter's (the embedding's for a
    language model, also when accelerate spread it over several devices)."""
    import torch
    for t in model.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def to_device(obj: Any, device) -> Any:
    """Tensors in ``obj`` (nested tuples, lists, dicts) on ``device``; anything else unchanged."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def model_dtype(model) -> str:
    """The name of a model's floating-point parameter dtype (the most common one)."""
    counts: dict[str, int] = {}
    for t in model.parameters():
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.get) if counts else "float32"
