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

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from ..adapters import LoadedModel, build_base, describe_base, write_base_files
from ..depth.identity import PrunedModule, make_stand_in, run_plain_paths
from ..errors import UserError
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


def load_model_dir(path: str | Path, trust_code: bool = False) -> LoadedModel:
    """Load a self-contained pruned-model directory (see the module docstring)."""
    p = Path(path)
    try:
        structure = json.loads((p / STRUCTURE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p / STRUCTURE_FILE} is not readable JSON: {e}") from None
    if not isinstance(structure, dict) or not isinstance(structure.get("base"), dict):
        raise UserError(f"{p / STRUCTURE_FILE} does not describe a base architecture")
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
