"""Saving and loading pruned (and sparsified) model directories: safetensors + JSON, never
pickle, never code unless the caller names it.

A directory holds ``model.safetensors`` (the weights), ``plan.json`` (base-model spec and
fingerprint, BatchNorm folds, every applied operation), ``report.json`` (see `io.report`),
``sparsity.json`` after ``sparsify``, and the marker of `io.outdir`. Loading rebuilds the base
model from the plan's spec, replays the plan and loads the weights. A plan whose base is
``python:MODULE:CALLABLE`` (imports and runs code) or a ``.pt`` checkpoint (unpickles) is
refused unless ``trust_code`` is given (the CLI's ``--trust-code``): directories are files
people share, and opening one must not run what it names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..adapters.load import load_model
from ..depth.plan import PLAN_FORMAT, base_plan, plan_dict, replay_plan
from ..errors import UserError, one_line
from ..integrity import check_safetensors, read_json_file
from ..placement import DEFAULT, place
from ..sparsity.sparsify import add_biases
from .graph_file import graph_json
from .outdir import write_output_dir
from .self_contained import is_self_contained, load_model_dir, write_model_files

PLAN = "plan.json"
WEIGHTS = "model.safetensors"
SPARSITY = "sparsity.json"


# --------------------------------------------------------------------------- validation
def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def validate_plan(plan: Any, where: str = PLAN) -> dict:
    """Check the shape of a plan (the fields `replay_plan` reads) and return it; raises
    `UserError` with one line naming the first problem."""
    if not isinstance(plan, dict):
        raise UserError(f"{where} holds a JSON {_type(plan)}, not a plan object; it is not a depthprune plan")
    if "base" not in plan:
        raise UserError(f"{where} has no 'base' (the spec of the model it was made from); it is not a depthprune "
                        "plan (write it again with `depthprune prune`)")
    if not isinstance(plan["base"], str) or not plan["base"].strip():
        raise UserError(f"{where}: 'base' must be a model spec string, got {_type(plan['base'])} {plan['base']!r}")
    if plan.get("format") != PLAN_FORMAT:
        raise UserError(f"{where}: unsupported plan format {plan.get('format')!r} (this depthprune reads format "
                        f"{PLAN_FORMAT})")
    expect = {"fingerprint": str, "steps": list, "folds": list}
    for key, typ in expect.items():
        if not isinstance(plan.get(key), typ):
            raise UserError(f"{where}: '{key}' must be a {typ.__name__}, got {_type(plan.get(key))}")
    if plan.get("recipe") is not None and not isinstance(plan["recipe"], dict):
        raise UserError(f"{where}: 'recipe' must be an object, got {_type(plan['recipe'])}")
    for i, s in enumerate(plan["steps"]):
        if not isinstance(s, dict):
            raise UserError(f"{where}: step {i} is a {_type(s)}, not an object")
        for key, typ in (("unit", str), ("kind", str), ("params_removed", int), ("ops", list)):
            if not isinstance(s.get(key), typ):
                raise UserError(f"{where}: step {i} ('{s.get('unit', '?')}'): '{key}' must be a {typ.__name__}, "
                                f"got {_type(s.get(key))}")
        for op in s["ops"]:
            if not isinstance(op, dict) or not isinstance(op.get("op"), str):
                raise UserError(f"{where}: step {i} ('{s['unit']}') has an operation without an 'op' name")
    return plan


def runs_code(spec: str) -> str | None:
    """Why loading model ``spec`` would run code from outside depthprune (None when it
    would not): a ``python:`` spec imports a module, a ``.pt`` checkpoint is a pickle."""
    if spec.startswith("python:"):
        return f"importing and running {spec[len('python:'):]!r}"
    if spec.endswith(".pt"):
        return "unpickling a checkpoint, which can run arbitrary code"
    return None


def read_plan(directory: str | os.PathLike) -> dict:
    """The validated plan of an output directory."""
    p = Path(directory) / PLAN
    if not p.exists() and not p.is_symlink():
        raise UserError(f"{directory} has no {PLAN}; it is not a depthprune output directory")
    return validate_plan(read_json_file(p, "plan"), str(p))


def read_added_bias(directory: Path) -> list[str]:
    """The layers ``sparsify`` gave a bias (STADE's correction), from ``sparsity.json``."""
    p = directory / SPARSITY
    if not p.exists() and not p.is_symlink():
        return []
    data = read_json_file(p, "sparsity record")
    added = data.get("added_bias", []) if isinstance(data, dict) else None
    if not isinstance(added, list) or not all(isinstance(a, str) for a in added):
        raise UserError(f"{p}: 'added_bias' must be a list of layer names")
    return added


def check_model_dir(directory: str | os.PathLike, trust_code: bool = False) -> dict:
    """Everything about an output directory that can be checked without loading a model: the
    plan's shape, whether its base would run code (refused without ``trust_code``), and the
    weights file's integrity. Returns the plan."""
    d = Path(directory)
    plan = read_plan(d)
    why = runs_code(plan["base"])
    if why is not None and not trust_code:
        raise UserError(f"{d / PLAN} names base {plan['base']!r}: loading it means {why}; pass --trust-code "
                        "only if you trust where this directory came from")
    w = d / WEIGHTS
    if not w.is_file():
        raise UserError(f"{d} has no {WEIGHTS}; it is not a complete depthprune output")
    check_safetensors(w)
    read_added_bias(d)
    return plan


def is_model_dir(path: str | os.PathLike) -> bool:
    """A directory holding a ``plan.json`` (a depthprune output, complete or not)."""
    return Path(path).is_dir() and (Path(path) / PLAN).is_file()


# --------------------------------------------------------------------------- saving
def structure_files(spec_or_dir: str | os.PathLike) -> dict[str, str]:
    """Files of an output directory that describe its structure, for a command that changes
    weights only (sparsify, finetune) to carry into its own output: ``graph.json`` (every node's
    state: the pruning map and drawings of ``report.html``). ``{}`` for a model spec."""
    d = Path(spec_or_dir)
    if is_model_dir(d) and (d / "graph.json").is_file():
        return {"graph.json": json.dumps(read_json_file(d / "graph.json", "graph"), indent=1)}
    return {}


def pruned_files(pruner, base_spec: str, base_fingerprint: str, extra_files: dict | None = None) -> dict:
    """The JSON files of a pruned-model directory: the plan, the computation graph with every
    node's state (``graph.json``, what `depthprune viz` draws) and ``extra_files``."""
    return {PLAN: plan_dict(pruner, base_spec, base_fingerprint), "graph.json": graph_json(pruner),
            **(extra_files or {})}


def write_dir(out: str | os.PathLike, files: dict[str, Any], model: Any, force: bool = False,
              protect=(), command: str = "write", lm: Any = None) -> Path:
    """Write ``files`` (name -> str or JSON-able) and ``model``'s weights as a depthprune output
    directory (`io.outdir.OutputDir`: checked, locked, temporary sibling, marker, rename);
    self-contained when ``lm`` (the `LoadedModel` holding the model) is given."""
    return write_output_dir(out, files, model, force=force, protect=protect, command=command,
                            write_model=None if lm is None else (lambda d: write_model_files(lm, d)))


def save_pruned(pruner, out: str | os.PathLike, base_spec: str, base_fingerprint: str,
                extra_files: dict | None = None, force: bool = False, lm: Any = None) -> Path:
    """Save a `DepthPruner`'s model: weights, plan (replayable on ``base_spec``) and ``extra_files``;
    self-contained (loads without the base model) when ``lm``, the `LoadedModel`, is given."""
    return write_dir(out, pruned_files(pruner, base_spec, base_fingerprint, extra_files), pruner.model,
                     force=force, protect=[base_spec], command="prune", lm=lm)


# --------------------------------------------------------------------------- loading
def load_pruned(path: str | os.PathLike, trust_code: bool = False, progress: bool = True, placement=None):
    """Load a pruned (and/or sparsified) model directory; returns ``(LoadedModel, DepthPruner)``
    with weights loaded. A self-contained directory (``structure.json``) is built directly from
    its structure (the `DepthPruner` is then None); an older one is rebuilt from its base spec by
    replaying the plan (``sparsity.json``'s ``added_bias`` layers get their bias back first).
    ``trust_code`` allows a base that is a ``python:`` spec or a ``.pt`` checkpoint. ``placement``
    (`depthprune.placement.Placement`): device and dtype; the weights keep the dtype they were
    saved in unless it names one."""
    lm, pruner = _load_pruned(path, trust_code, progress)
    return place(lm, placement or DEFAULT), pruner


def _load_pruned(path: str | os.PathLike, trust_code: bool, progress: bool):
    from safetensors.torch import load_model as st_load_model

    d = Path(path)
    if is_self_contained(d):  # structure + weights: no base model, no trace, no plan replay
        read_plan(d)
        check_safetensors(d / WEIGHTS)
        return load_model_dir(d, trust_code), None
    plan = check_model_dir(d, trust_code)
    lm = load_model(plan["base"], trust_checkpoint=trust_code, progress=progress, trust_code=trust_code)
    try:
        pruner = replay_plan(plan, lm.model, lm.example_inputs, lm.forward_fn, on_change=lm.on_change)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise UserError(f"{d / PLAN} does not replay on its base {plan['base']!r} ({one_line(e)}); "
                        "the plan is damaged or was made by another version") from None
    added = read_added_bias(d)
    if added:
        try:
            add_biases(lm.model, added)
        except (AttributeError, TypeError) as e:
            raise UserError(f"{d / SPARSITY} names layers the model does not have ({one_line(e)})") from None
    try:
        st_load_model(lm.model, str(d / WEIGHTS), strict=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{d / WEIGHTS} does not match the model {PLAN} describes ({one_line(e)}); "
                        "write the directory again") from None
    lm.model.eval()
    return lm, pruner


def open_model(spec_or_dir: str, trust_checkpoint: bool = False, trust_code: bool = False, progress: bool = True,
               placement=None):
    """A model spec or an output directory -> ``(LoadedModel, plan dict to save it with)``.

    ``trust_checkpoint`` allows a ``.pt`` given directly as ``spec_or_dir``; ``trust_code``
    allows that and a directory whose plan's base runs code."""
    if is_model_dir(spec_or_dir):
        lm, _ = load_pruned(spec_or_dir, trust_code, progress, placement)
        return lm, read_plan(spec_or_dir)
    lm = load_model(spec_or_dir, trust_checkpoint=trust_checkpoint or trust_code, progress=progress,
                    trust_code=trust_code, placement=placement)
    return lm, base_plan(spec_or_dir, lm.model, lm.recipe)
