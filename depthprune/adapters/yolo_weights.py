"""Ultralytics detectors as files without pickle: model YAML + safetensors + JSON metadata.

A detector directory holds ``model.yaml`` (the architecture, with its ``scale`` and ``nc``),
``model.safetensors`` (the state dict, floating tensors stored in fp16) and ``meta.json``
(``imgsz``, ``names``, training arguments and results). Loading builds ``DetectionModel`` from
the YAML and loads the tensors: no code runs from the files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from ..errors import SpecError
from .yolo_build import detection_model

from .packaged import PACKAGED_DETECTORS, is_detector_dir  # noqa: F401  (light: the CLI checks specs with them)


def save_detector(model: torch.nn.Module, out_dir: str, meta: dict) -> None:
    """Write ``model`` (an ultralytics ``DetectionModel``) to ``out_dir`` as YAML + fp16
    safetensors + ``meta.json`` (``meta`` must hold at least ``imgsz`` and ``names``)."""
    from safetensors.torch import save_file
    for key in ("imgsz", "names"):
        if key not in meta:
            raise ValueError(f"detector metadata needs {key!r}")
    os.makedirs(out_dir, exist_ok=True)
    cfg = {k: v for k, v in model.yaml.items() if k != "yaml_file"}
    with open(os.path.join(out_dir, "model.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def load_detector(path: str | os.PathLike, trust_code: bool = False) -> tuple[torch.nn.Module, dict]:
    """Build the ``DetectionModel`` stored in directory ``path`` (float32, eval mode) and return it
    with its metadata. The model carries ``names`` and, as ``args``, the training arguments
    (loss gains) when the metadata has them. Its ``model.yaml`` goes through the model-YAML gate
    (`depthprune.adapters.yolo.detection_model`): code in it runs only with ``trust_code``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    files = [path / n for n in ("model.yaml", "model.safetensors", "meta.json")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SpecError(f"{path} is not a detector directory (missing {', '.join(missing)})")
    try:
        with open(files[0], encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        with open(files[2], encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        text = " ".join(str(e).split())[:200]
        raise SpecError(f"{path} holds an unreadable model.yaml or meta.json: {text}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("names"), list):
        raise SpecError(f"{files[2]} must be a JSON object with a list of class names under \"names\"")
    model = detection_model(cfg, str(files[0]), trust_code)
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(files[1]).items()}
    except (SafetensorError, OSError) as e:
        raise SpecError(f"{files[1]} is not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpecError(f"weights in {path} do not fit its model.yaml: {str(e).splitlines()[0]}") from None
    model.names = {i: n for i, n in enumerate(meta["names"])}
    if isinstance(meta.get("train_args"), dict):
        model.args = dict(meta["train_args"])
    return model.float().eval(), meta
