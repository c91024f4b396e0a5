"""Models the user's own code builds (``python:MODULE:CALLABLE``): the `GENERIC` family's loader.

The callable returns a module, or a module and example inputs (or a module with an
``example_inputs`` attribute). A Hugging Face model it returns goes to the Hugging Face adapter,
which knows its forward."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch.nn as nn

from ..errors import SpecError, one_line
from .base import LoadedModel
from .hf import is_hf_model, wrap_user_model


def load_python(spec: str) -> LoadedModel:
    _, mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise SpecError(f"cannot import {mod_name!r}: no such module (is its folder on PYTHONPATH?)") from None
        raise SpecError(f"importing {mod_name!r} failed: {one_line(e)}") from None
    except (Exception, SystemExit) as e:  # the user's module: any error is theirs to fix
        raise SpecError(f"importing {mod_name!r} failed: {one_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SpecError(f"{mod_name} has no callable {fn_name!r}")
    try:
        out = fn()
    except (Exception, SystemExit) as e:
        raise SpecError(f"{mod_name}.{fn_name}() raised {one_line(e)}") from None
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
    if is_hf_model(model):  # its forward returns a ModelOutput (and a cache): the HF adapter knows
        return wrap_user_model(model, inputs, spec)
    return LoadedModel(model=model.eval(), example_inputs=inputs, spec=spec)


def build(desc: dict, directory: Path, trust_code: bool = False, empty: bool = True) -> LoadedModel:
    """The user's model again (its ``python:`` spec runs): only with ``trust_code``."""
    base = str(desc.get("spec"))
    if not trust_code:
        raise SpecError(f"{directory} was pruned from {base!r}: rebuilding it imports and runs that Python "
                        "code; pass --trust-code only if you trust it")
    lm = load_python(base)
    lm.extra["base_spec"] = base
    lm.spec = str(directory)
    return lm

