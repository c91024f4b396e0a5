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
from ..depth.plan import base_plan, plan_dict, replay_plan
from ..errors import UserError, one_line
from ..integrity import check_safetensors, read_json_file
from ..placement import DEFAULT, place
from ..sparsity.sparsify import add_biases
from .graph_file import graph_json
from .outdir import write_output_dir
from .plan_file import PLAN, SPARSITY, WEIGHTS, check_model_dir, is_model_dir, read_added_bias, read_plan
from .self_contained import is_self_contained, load_model_dir, write_model_files

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
