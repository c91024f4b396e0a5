"""Model specs to modules: the only architecture-aware entry point.

Specs: ``smollm2-135m`` (packaged real model), ``random-llama[:LAYERS]`` (tiny random Llama),
a Hugging Face directory or hub id, a ``.gguf`` file, an ultralytics ``.yaml``/``.pt``,
``yolov5n-synth`` (packaged detector trained here) or a detector directory (YAML + safetensors), and
``python:MODULE:CALLABLE`` (the callable returns a module, or a module and example inputs).

`check_spec` answers, without loading anything heavy, whether a spec can be loaded (the file
exists and looks intact, a checkpoint is trusted); `load_model` calls it first.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from ..errors import SpecError, UserError
from ..integrity import check_gguf, check_safetensors
from .base import LoadedModel
from .packaged import PACKAGED_DETECTORS, is_detector_dir

__all__ = ["LoadedModel", "build_base", "calibration", "check_spec", "context_length", "describe_base", "load_model",
           "write_base_files"]

SPEC_HELP = ("use smollm2-135m, random-llama[:N], yolov5n-synth, a Hugging Face directory or hub id, a .gguf "
             "file, an ultralytics .yaml/.pt or detector directory, or python:MODULE:CALLABLE")


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not os.path.exists(spec)


def check_spec(spec: str, trust_checkpoint: bool = False) -> None:
    """Raise `SpecError` (one line) when ``spec`` cannot be a loadable model: a missing file, a
    file that is not what its name says, a directory without ``config.json`` or with a damaged
    weights file, a depthprune output directory where a base model is needed, an untrusted
    ``.pt``. Cheap: reads headers only."""
    if not spec or not spec.strip():
        raise SpecError(f"empty model spec; {SPEC_HELP}")
    if spec in ("smollm2-135m", "random-llama") or spec.startswith("random-llama:"):
        if spec.startswith("random-llama:"):
            layers = spec.split(":", 1)[1]
            if not layers.isdigit() or not 1 <= int(layers) <= 64:
                raise SpecError(f"random-llama:LAYERS needs a layer count from 1 to 64, got {layers!r}")
        return
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SpecError(f"python spec must be python:MODULE:CALLABLE, got {spec!r}")
        return
    if spec.endswith(".pt"):
        if not os.path.isfile(spec):
            raise SpecError(f"no such checkpoint: {spec}")
        if not trust_checkpoint:
            raise SpecError(f"{spec} is a pickled checkpoint (loading it can run code); pass --trust-checkpoint "
                            "only if you trust its source")
        return
    if spec.endswith((".yaml", ".yml")):
        if (os.sep in spec or os.path.exists(spec)) and not os.path.isfile(spec):
            raise SpecError(f"no such model YAML: {spec}")
        return
    if spec.endswith(".gguf"):
        check_gguf(spec)
        return
    if spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        return
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "plan.json")):
            raise SpecError(f"{spec} is a depthprune output directory; this command needs a base model (the "
                            "directory's plan.json names its base); `sparsify` reads output directories")
        cfg = os.path.join(spec, "config.json")
        if not os.path.isfile(cfg):
            raise SpecError(f"{spec} is a directory without config.json (not a Hugging Face model)")
        try:
            with open(cfg, encoding="utf-8") as f:
                ok = isinstance(json.load(f), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise SpecError(f"{cfg} is not a JSON object; restore the model's config.json")
        for name in sorted(os.listdir(spec)):
            if name.endswith(".safetensors"):
                check_safetensors(os.path.join(spec, name), fix="download or convert the model again")
        return
    if os.path.exists(spec):
        raise SpecError(f"{spec} is a file depthprune cannot load as a model; {SPEC_HELP}")
    if _is_hub_id(spec):
        return
    raise SpecError(f"unknown model spec {spec!r}: {SPEC_HELP}")


def load_model(spec: str, trust_checkpoint: bool = False, progress: bool = True) -> LoadedModel:
    """Resolve a model spec; raises `SpecError` with a one-line message when it cannot.
    ``progress`` allows a status line on stderr for slow steps (the one-time GGUF conversion)."""
    check_spec(spec, trust_checkpoint)
    if spec == "smollm2-135m":
        from .hf import load_smollm2
        return load_smollm2(spec, progress=progress)
    if spec == "random-llama" or spec.startswith("random-llama:"):
        from .hf import random_llama, wrap
        layers = spec.split(":", 1)[1] if ":" in spec else "2"
        return wrap(random_llama(int(layers)), spec)
    if spec.startswith("python:"):
        return _load_python(spec)
    if spec.endswith((".yaml", ".yml", ".pt")) or spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        from .yolo import load_yolo
        return load_yolo(spec, trust_checkpoint=trust_checkpoint)
    if spec.endswith(".gguf"):
        from .hf import load_gguf
        return load_gguf(spec, spec, progress)
    from .hf import load_hf
    return load_hf(spec)


def describe_base(lm: LoadedModel) -> dict:
    """The base architecture of ``lm`` as data (no weights), for self-contained directories."""
    if lm.family == "causal_lm":
        from .hf import describe
        return describe(lm.model)
    if lm.family == "yolo":
        from .yolo import describe
        return describe(lm)
    return {"kind": "python", "spec": lm.extra.get("base_spec", lm.spec)}


def build_base(desc: dict, directory: Path, trust_code: bool = False, empty: bool = True) -> LoadedModel:
    """The described base architecture, weights not loaded: empty where the family allows it
    (``empty``), else random; ``directory`` is where it was read from (its tokenizer, messages).
    A ``python:`` base imports and runs the user's code, so it needs ``trust_code``."""
    kind, spec = desc.get("kind"), str(directory)
    if kind == "transformers":
        from .hf import build
        return build(desc, Path(directory), spec, empty)
    if kind == "ultralytics":
        from .yolo import build
        return build(desc, spec)
    if kind == "python":
        base = str(desc.get("spec"))
        if not trust_code:
            raise SpecError(f"{directory} was pruned from {base!r}: rebuilding it imports and runs that Python "
                            "code; pass --trust-code only if you trust it")
        lm = _load_python(base)
        lm.extra["base_spec"] = base
        lm.spec = spec
        return lm
    raise SpecError(f"{directory}: unknown base architecture kind {kind!r}")


def write_base_files(lm: LoadedModel, structure: dict, out: Path) -> None:
    """Files a family adds to a model directory (Hugging Face: config, modeling code, tokenizer)."""
    if lm.family == "causal_lm":
        from .hf import write_files
        write_files(lm, structure, out)


def _load_python(spec: str) -> LoadedModel:
    import torch.nn as nn
    _, mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise SpecError(f"cannot import {mod_name!r}: no such module (is its folder on PYTHONPATH?)") from None
        raise SpecError(f"importing {mod_name!r} failed: {_one_line(e)}") from None
    except (Exception, SystemExit) as e:  # the user's module: any error is theirs to fix
        raise SpecError(f"importing {mod_name!r} failed: {_one_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SpecError(f"{mod_name} has no callable {fn_name!r}")
    try:
        out = fn()
    except (Exception, SystemExit) as e:
        raise SpecError(f"{mod_name}.{fn_name}() raised {_one_line(e)}") from None
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if not isinstance(model, nn.Module):
        raise SpecError(f"{mod_name}.{fn_name}() returned {type(model).__name__}, not an nn.Module")
    if inputs is None:
        inputs = getattr(model, "example_inputs", None)
    if inputs is None:
        raise SpecError(f"{mod_name}.{fn_name}() must return (module, example_inputs) "
                        "or a module with an `example_inputs` attribute")
    if not isinstance(inputs, (tuple, list, dict)):
        inputs = (inputs,)
    from .hf import is_hf_model, wrap_user_model
    if is_hf_model(model):  # its forward returns a ModelOutput (and a cache): the HF adapter knows
        return wrap_user_model(model, inputs, spec)
    return LoadedModel(model=model.eval(), example_inputs=inputs, spec=spec, family="generic")


def context_length(lm: LoadedModel) -> int | None:
    """The longest sequence the model accepts (the config's ``max_position_embeddings``, or the
    older names of it), None when unknown."""
    cfg = getattr(lm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len",
                 "context_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def calibration(lm: LoadedModel, text_spec: str, samples: int, seq_len: int, batch_size: int = 8) -> list:
    """Calibration batches for ``lm``: text windows for causal LMs (``text_spec``), the images
    ultralytics ships for YOLO (``samples`` of them), ``[example_inputs]`` otherwise."""
    if samples < 1:
        raise UserError(f"--calib-samples must be at least 1, got {samples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if lm.family == "causal_lm":
        from .text import load_text
        from .tokens import calibration_batches, token_windows, tokenizer_of
        ctx = context_length(lm)
        if ctx is not None and seq_len > ctx:
            raise UserError(f"--seq-len {seq_len} is longer than {lm.spec}'s context of {ctx} tokens; "
                            f"use --seq-len {ctx} or less")
        return calibration_batches(token_windows(tokenizer_of(lm), load_text(text_spec), samples, seq_len),
                                   batch_size)
    if lm.family == "yolo":
        from .yolo import calibration_images
        return calibration_images(samples, lm.example_inputs[0].shape[-1])
    return [lm.example_inputs]
