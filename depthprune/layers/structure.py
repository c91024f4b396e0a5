"""The structure of a pruned model as data: what differs from its base architecture.

A pruned model is its base architecture with some modules replaced by parameter-free stand-ins
and some modules resized (width pruning, added biases). `structure_of` records exactly that;
`apply_structure` rebuilds it on a freshly built base architecture (usually with empty weights),
after which the pruned weights load by name. No trace and no base weights are needed.

This module imports only torch and the stand-ins' module, so `depthprune export` can ship its
source inside a Hugging Face directory whose modeling code runs where depthprune is not installed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

STRUCTURE_FORMAT = 1


def _width_attrs(module: nn.Module) -> dict:
    """The integer attributes of a module (widths, groups, kernel sizes: what pruning may change)."""
    out = {}
    for k, v in vars(module).items():
        if k == "training" or isinstance(v, bool):
            continue
        if isinstance(v, int) or (isinstance(v, (tuple, list)) and v and all(isinstance(x, int) and not isinstance(x, bool)
                                                                            for x in v)):
            out[k] = list(v) if isinstance(v, (tuple, list)) else v
    return out


def _tensor_shapes(module: nn.Module) -> dict:
    return {
        "parameters": {k: (list(p.shape) if p is not None else None) for k, p in module._parameters.items()},
        "buffers": {k: (list(b.shape) if b is not None else None) for k, b in module._buffers.items()},
        # buffers that are not saved (rotary frequencies) keep the dtype the model had
        "buffer_dtypes": {k: str(b.dtype).removeprefix("torch.") for k, b in module._buffers.items()
                          if b is not None and k in module._non_persistent_buffers_set},
    }


def structure_of(model: nn.Module, is_stand_in: Callable[[nn.Module], bool],
                 spec_of: Callable[[nn.Module], dict]) -> dict:
    """The structure of ``model``: every stand-in (outermost), and every other module that holds
    parameters or buffers of its own, with its integer attributes (widths, groups) and tensor shapes.
    Recording every module, not only the ones pruning touched, keeps this independent of how the
    model got its shape (depth pruning, a sparsifier's added biases, folded norms)."""
    stand_ins: dict = {}
    modules: dict = {}
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in stand_ins):
            continue
        if path and is_stand_in(m):
            stand_ins[path] = spec_of(m)
        elif m._parameters or m._buffers:
            modules[path] = {"class": type(m).__name__, "attrs": _width_attrs(m), **_tensor_shapes(m)}
    return {"format": STRUCTURE_FORMAT, "stand_ins": stand_ins, "modules": modules, "tied": tied_groups(model)}


def apply_structure(model: nn.Module, structure: dict, make_stand_in: Callable[[dict], nn.Module]) -> None:
    """Give the base architecture ``model`` the recorded structure, in place. New tensors are
    empty, on the device and in the dtype of the tensors they replace (load weights afterwards)."""
    if structure.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"unsupported structure format {structure.get('format')!r}")
    for path, spec in sorted(structure.get("stand_ins", {}).items(), key=lambda kv: kv[0].count(".")):
        model.set_submodule(path, make_stand_in(spec))
    for path, rec in structure.get("modules", {}).items():
        m = model.get_submodule(path)
        if type(m).__name__ != rec.get("class", type(m).__name__):
            raise ValueError(f"{path} is a {type(m).__name__}, the structure recorded a {rec['class']}")
        for k, v in rec.get("attrs", {}).items():
            setattr(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)
        ref = next((t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None), None)
        for store_name, shapes in (("_parameters", rec.get("parameters", {})), ("_buffers", rec.get("buffers", {}))):
            store = getattr(m, store_name)
            for k, shape in shapes.items():
                old = store.get(k)
                if shape is None:
                    store[k] = None
                    continue
                if old is not None and list(old.shape) == shape:
                    continue
                like = old if old is not None else ref
                t = torch.empty(shape, dtype=like.dtype if like is not None else torch.float32,
                                device=like.device if like is not None else "cpu")
                store[k] = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else True) \
                    if store_name == "_parameters" else t
        for k, dtype in rec.get("buffer_dtypes", {}).items():
            if m._buffers.get(k) is not None:
                m._buffers[k] = m._buffers[k].to(getattr(torch, dtype))


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one tensor (tied embeddings), each group in module order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]], present: set | None = None) -> None:
    """Make every name of each group refer to one parameter: the group's first name in
    ``present`` (the names a weights file holds), else its first name."""
    for names in groups:
        src = next((n for n in names if present is None or n in present), names[0])
        first = model.get_parameter(src)
        for name in names:
            if name != src:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, attr, first)
