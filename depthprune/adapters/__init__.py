"""Model specs to modules: the only architecture-aware entry point.

Specs: ``smollm2-135m`` (packaged real model), ``random-llama[:LAYERS]`` (tiny random Llama),
a Hugging Face directory or hub id, a ``.gguf`` file, an ultralytics ``.yaml``/``.pt``, and
``python:MODULE:CALLABLE`` (the callable returns a module, or a module and example inputs).
"""
from __future__ import annotations

import importlib
import os

import torch.nn as nn

from ..errors import SpecError
from .base import LoadedModel

__all__ = ["LoadedModel", "load_model"]


def load_model(spec: str, trust_checkpoint: bool = False) -> LoadedModel:
    """Resolve a model spec; raises `SpecError` with a one-line message when it cannot."""
    if not spec:
        raise SpecError("empty model spec")
    if spec == "smollm2-135m":
        from .hf import load_smollm2
        return load_smollm2(spec)
    if spec == "random-llama" or spec.startswith("random-llama:"):
        from .hf import random_llama, wrap
        layers = spec.split(":", 1)[1] if ":" in spec else "2"
        if not layers.isdigit() or int(layers) < 1:
            raise SpecError(f"random-llama:LAYERS needs a positive layer count, got {layers!r}")
        return wrap(random_llama(int(layers)), spec)
    if spec.startswith("python:"):
        return _load_python(spec)
    if spec.endswith((".yaml", ".yml", ".pt")):
        from .yolo import load_yolo
        return load_yolo(spec, trust_checkpoint=trust_checkpoint)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise SpecError(f"no such GGUF file: {spec}")
        from .hf import load_gguf
        return load_gguf(spec, spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise SpecError(f"{spec} is a directory without config.json (not a Hugging Face model)")
        from .hf import load_hf
        return load_hf(spec)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from .hf import load_hf
        return load_hf(spec)
    raise SpecError(f"unknown model spec {spec!r}: use smollm2-135m, random-llama[:N], a Hugging Face "
                    "directory or hub id, a .gguf file, an ultralytics .yaml/.pt, or python:MODULE:CALLABLE")


def _load_python(spec: str) -> LoadedModel:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SpecError(f"python spec must be python:MODULE:CALLABLE, got {spec!r}")
    try:
        module = importlib.import_module(parts[1])
    except ImportError as e:
        raise SpecError(f"cannot import {parts[1]!r}: {e}") from None
    fn = getattr(module, parts[2], None)
    if not callable(fn):
        raise SpecError(f"{parts[1]} has no callable {parts[2]!r}")
    out = fn()
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if not isinstance(model, nn.Module):
        raise SpecError(f"{parts[1]}.{parts[2]}() returned {type(model).__name__}, not an nn.Module")
    if inputs is None:
        inputs = getattr(model, "example_inputs", None)
    if inputs is None:
        raise SpecError(f"{parts[1]}.{parts[2]}() must return (module, example_inputs) "
                        "or a module with an `example_inputs` attribute")
    if not isinstance(inputs, (tuple, list, dict)):
        inputs = (inputs,)
    from .hf import is_hf_model, wrap_user_model
    if is_hf_model(model):  # its forward returns a ModelOutput (and a cache): the HF adapter knows
        return wrap_user_model(model, inputs, spec)
    return LoadedModel(model=model.eval(), example_inputs=inputs, spec=spec, family="generic")


def calibration(lm: LoadedModel, text_spec: str, samples: int, seq_len: int, batch_size: int = 8) -> list:
    """Calibration batches for ``lm``: text windows for causal LMs (``text_spec``), the images
    ultralytics ships for YOLO (``samples`` of them), ``[example_inputs]`` otherwise."""
    from ..errors import UserError
    if samples < 1:
        raise UserError(f"--calib-samples must be at least 1, got {samples}")
    if lm.family == "causal_lm":
        from ..eval import calibration_batches, token_windows, tokenizer_of
        from .text import load_text
        return calibration_batches(token_windows(tokenizer_of(lm), load_text(text_spec), samples, seq_len),
                                   batch_size)
    if lm.family == "yolo":
        from .yolo import calibration_images
        return calibration_images(samples, lm.example_inputs[0].shape[-1])
    return [lm.example_inputs]
