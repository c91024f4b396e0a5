"""Model specs to modules: the only architecture-aware entry point.

Specs: ``smollm2-135m`` (packaged real model), ``random-llama[:LAYERS]`` (tiny random Llama),
a Hugging Face directory or hub id, a ``.gguf`` file, an ultralytics ``.yaml``/``.pt``,
``yolov5n-synth`` (packaged detector trained here) or a detector directory (YAML + safetensors), and
``python:MODULE:CALLABLE`` (the callable returns a module, or a module and example inputs).

The package itself is light (no torch): `check_spec` (`adapters/spec.py`) answers from file
headers, without loading a model, whether a
spec can be loaded (the file exists and looks intact, a checkpoint is trusted, a Hugging Face
config that ships its own code is trusted); `load_model` calls it first. A spec that is no
existing path but reads as a hub id is looked up offline first (the local Hugging Face cache),
then with one bounded request. Loading is `depthprune.adapters.load` (`load_model`,
`calibration`, `build_base`, ...), one module per family beside it. Every `LoadedModel` carries its family's `Family` object
(`lm.adapter`): the rest of depthprune asks it, never which family a model is.
"""
from __future__ import annotations

from .base import GENERIC, Family, LoadedModel, context_length
from .spec import SPEC_HELP, check_spec

__all__ = ["GENERIC", "Family", "LoadedModel", "SPEC_HELP", "check_spec", "context_length"]
