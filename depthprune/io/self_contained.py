"""Self-contained model directories: the pruned architecture as data plus its weights.

A directory written by `write_model_files` holds ``model.safetensors`` (the pruned weights, dtype
kept, tied tensors stored once) and ``structure.json``: the base architecture as data (no
weights; a Hugging Face configuration, an ultralytics model YAML, or a ``python:`` spec) and the
structure of the pruned model (`depthprune.layers.structure`). `load_model_dir` builds the base
architecture with empty weights, gives it that structure and loads the weights by name: no base
checkpoint, no trace, no pickle, and no code from the directory is run (a ``python:`` base runs
the user's callable only with ``trust_code``). Hugging Face bases also get the files of the
``depthprune`` format (`depthprune.adapters.hf_remote`) and their tokenizer.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch.nn.modules.module import register_module_buffer_registration_hook, register_module_parameter_registration_hook

from ..adapters import LoadedModel

from ..adapters.load import build_base, describe_base, write_base_files
from ..depth.identity import PrunedModule, make_stand_in, run_plain_paths
from ..errors import UserError
from ..integrity import check_safetensors, read_json_file
from ..layers.structure import apply_structure, retie, structure_of

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"


def model_structure(lm: LoadedModel) -> dict:
    """``structure.json`` of a loaded (possibly pruned) model."""
    s = structure_of(lm.model, lambda m: isinstance(m, PrunedModule), lambda m: m.spec())
    return {**s, "base": describe_base(lm)}


def write_model_files(lm: LoadedModel, out: Path) -> None:
    """Weights, structure and the family's own files (config, modeling code, tokenizer) into ``out``."""
    structure = model_structure(lm)
    save_model(lm.model, str(out / WEIGHTS_FILE))
    (out / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
    write_base_files(lm, structure, out)


def is_self_contained(path: str | Path) -> bool:
    p = Path(path)
    return (p / STRUCTURE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


#: How much larger than its weights file a base architecture may be (a pruned model keeps at
#: least this share of its base's tensors and elements), before the directory is called damaged.
BASE_GROWTH = 50
#: Elements a tensor that is not in the weights file may have (rotary frequencies, masks).
UNSAVED_ELEMENTS = 1 << 24


def _numel(shape: list) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_shapes(structure: dict, header: dict, where: Path) -> None:
    """Every tensor shape ``structure`` records is a list of non-negative integers, equal to the
    weights file's for a tensor it holds, small for one it does not: checked before anything is
    allocated from it."""
    modules = structure.get("modules", {})
    tied = structure.get("tied", [])
    if not isinstance(modules, dict) or not isinstance(structure.get("stand_ins", {}), dict):
        raise UserError(f"{where}: 'modules' and 'stand_ins' must be objects")
    if not isinstance(tied, list) or not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in tied):
        raise UserError(f"{where}: 'tied' must be a list of lists of tensor names")
    for group in tied:  # a tied tensor is stored once, under one of its names
        held = next((header[n] for n in group if n in header), None)
        if held is not None:
            header = {**header, **{n: held for n in group}}
    for path, rec in modules.items():
        if not isinstance(rec, dict):
            raise UserError(f"{where}: module {path!r} is not an object")
        for store in ("parameters", "buffers"):
            shapes = rec.get(store, {})
            if not isinstance(shapes, dict):
                raise UserError(f"{where}: {store} of {path!r} must be an object")
            for k, shape in shapes.items():
                if shape is None:
                    continue
                name = f"{path}.{k}" if path else k
                if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                          for d in shape):
                    raise UserError(f"{where}: the shape of {name} is not a list of sizes")
                held = header.get(name)
                if held is not None and held["shape"] != shape:
                    raise UserError(f"{where} records {name} as {shape}, the weights file holds {held['shape']}; "
                                    "the directory is damaged")
                if held is None and _numel(shape) > UNSAVED_ELEMENTS:
                    raise UserError(f"{where} records {name} as {shape} ({_numel(shape):,d} elements), which the "
                                    "weights file does not hold; the directory is damaged")


@contextlib.contextmanager
def bounded_build(header: dict, where: Path) -> Iterator[None]:
    """Inside this block, building modules that register more than `BASE_GROWTH` times the
    tensors or elements of the weights file stops with a `UserError` (a base architecture
    described by a damaged or hostile file is refused before it is allocated in full)."""
    max_tensors = BASE_GROWTH * len(header) + 4096
    max_elements = BASE_GROWTH * sum(_numel(v["shape"]) for v in header.values()) + UNSAVED_ELEMENTS
    seen = {"tensors": 0, "elements": 0}

    def count(module, name, tensor):
        if tensor is None:
            return None
        seen["tensors"] += 1
        seen["elements"] += tensor.numel()
        if seen["tensors"] > max_tensors or seen["elements"] > max_elements:
            raise UserError(f"{where} describes a base architecture far larger than its weights file (over "
                            f"{seen['tensors']:,d} tensors, {seen['elements']:,d} elements); the directory is damaged")
        return None
    hooks = [register_module_parameter_registration_hook(count), register_module_buffer_registration_hook(count)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def load_model_dir(path: str | Path, trust_code: bool = False) -> LoadedModel:
    """Load a self-contained pruned-model directory (see the module docstring). The structure's
    shapes are checked against the weights file's header before anything is built."""
    p = Path(path)
    structure = read_json_file(p / STRUCTURE_FILE, "structure")
    if not isinstance(structure, dict) or not isinstance(structure.get("base"), dict):
        raise UserError(f"{p / STRUCTURE_FILE} does not describe a base architecture")
    header = check_safetensors(p / WEIGHTS_FILE)
    check_shapes(structure, header, p / STRUCTURE_FILE)
    with bounded_build(header, p / STRUCTURE_FILE):
        lm = build_base(structure["base"], p, trust_code)
    try:
        apply_structure(lm.model, structure, make_stand_in)
        for path in structure.get("stand_ins", {}):
            run_plain_paths(lm.model, path)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{p / STRUCTURE_FILE} does not fit its base architecture: {e}") from None
    groups = structure.get("tied", [])
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{p / WEIGHTS_FILE} is not a readable safetensors file ({e}); the directory is damaged") from None
    tied = {n for names in groups for n in names}
    names = set(lm.model.state_dict())
    missing = sorted(n for n in names - state.keys() - tied)
    missing += [names_[0] for names_ in groups if not any(n in state for n in names_)]
    unexpected = sorted(state.keys() - names)
    if missing or unexpected:
        raise UserError(f"{p / WEIGHTS_FILE} does not match {p / STRUCTURE_FILE}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for names_ in groups:  # a tied tensor is stored once, under one of its names
        held = next(n for n in names_ if n in state)
        for n in names_:
            state.setdefault(n, state[held])
    try:
        lm.model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise UserError(f"{p / WEIGHTS_FILE} does not match {p / STRUCTURE_FILE}: {str(e).splitlines()[-1]}") from None
    retie(lm.model, groups, set(state))
    for name, t in list(lm.model.named_parameters()) + list(lm.model.named_buffers()):
        if t.is_meta:
            raise UserError(f"{p / WEIGHTS_FILE} holds no tensor for {name}")
    if lm.on_change is not None:
        lm.on_change(lm.model)
    lm.model.eval()
    return lm
