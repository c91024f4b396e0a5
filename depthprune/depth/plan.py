"""Plans, saving and loading pruned models (safetensors + JSON plan, never pickle).

A saved directory holds ``model.safetensors`` (the pruned weights), ``plan.json`` (base-model
spec and fingerprint, BN folds, every applied operation) and, from the CLI, ``report.json``.
Loading rebuilds the base model from its spec, replays the plan's structure and loads weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from ..errors import UserError
from .engine import DepthPruner

PLAN_FORMAT = 1


def fingerprint(model: nn.Module) -> str:
    """Hash of parameter/buffer names and shapes: identifies a base architecture."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)};".encode())
    return h.hexdigest()[:16]


def plan_dict(pruner: DepthPruner, base_spec: str, base_fingerprint: str) -> dict:
    return {"format": PLAN_FORMAT, "base": base_spec, "fingerprint": base_fingerprint,
            "recipe": pruner.recipe, "folds": pruner.folds,
            "steps": [s.as_dict() for s in pruner.steps]}


def replay_plan(plan: dict, model: nn.Module, example_inputs: Any, forward_fn=None,
                on_change=None) -> DepthPruner:
    """Replay `plan` on a fresh base model (structure only; weights come from the pruning)."""
    if plan.get("format") != PLAN_FORMAT:
        raise UserError(f"unsupported plan format {plan.get('format')!r}")
    fp = fingerprint(model)
    if fp != plan["fingerprint"]:
        raise UserError(f"plan was made for base model {plan['base']!r} (fingerprint {plan['fingerprint']}), "
                        f"but this model's fingerprint is {fp}")
    pruner = DepthPruner(model, example_inputs, forward_fn, recipe=plan.get("recipe") or {}, on_change=on_change)
    if pruner.folds != plan.get("folds", []):
        raise UserError("the base model's BatchNorm folds differ from the plan's")
    pruner.replay(plan["steps"])
    return pruner


def check_new_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output directory unless ``force`` (checked before long work, and again
    when writing)."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    return out


def write_dir(out: str | os.PathLike, files: dict[str, Any], model: nn.Module | None, force: bool = False,
              lm=None) -> Path:
    """Write files (name -> JSON-able or str) and the model into `out`, atomically. With ``lm``
    (the `LoadedModel` holding ``model``) the directory is self-contained (`depthprune.io.self_contained`)."""
    out = check_new_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if lm is not None:
            from ..io.self_contained import write_model_files
            write_model_files(lm, tmp)
        elif model is not None:
            st_save_model(model, str(tmp / "model.safetensors"))
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=1)
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pruned(pruner: DepthPruner, out, base_spec: str, base_fingerprint: str,
                extra_files: dict | None = None, force: bool = False, lm=None) -> Path:
    """Save the pruned model, its plan and ``extra_files``; self-contained when ``lm`` is given."""
    files = {"plan.json": plan_dict(pruner, base_spec, base_fingerprint), **(extra_files or {})}
    return write_dir(out, files, pruner.model, force=force, lm=lm)


def base_plan(spec: str, model: nn.Module, recipe: dict | None = None) -> dict:
    """The plan of an unpruned model (no steps): what a sparsified dense model is saved with."""
    return {"format": PLAN_FORMAT, "base": spec, "fingerprint": fingerprint(model), "recipe": recipe or {},
            "folds": [], "steps": []}


def is_model_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "plan.json").is_file()


def open_model(spec_or_dir: str, trust_checkpoint: bool = False):
    """A model spec or a saved directory -> (LoadedModel, plan dict to save it with)."""
    from ..adapters import load_model
    if is_model_dir(spec_or_dir):
        lm, pruner = load_pruned(spec_or_dir, trust_checkpoint)
        plan = json.loads((Path(spec_or_dir) / "plan.json").read_text())
        return lm, plan
    lm = load_model(spec_or_dir, trust_checkpoint=trust_checkpoint)
    return lm, base_plan(spec_or_dir, lm.model, lm.recipe)


def load_pruned(path: str | os.PathLike, trust_checkpoint: bool = False):
    """Load a pruned (and/or sparsified) model directory; returns (LoadedModel, DepthPruner)
    with weights loaded. ``sparsity.json``'s ``added_bias`` layers get their bias back first."""
    from ..adapters import load_model
    from ..adapters.hf import renumber_attention_layers
    p = Path(path)
    from ..io.self_contained import is_self_contained, load_model_dir
    if is_self_contained(p):
        return load_model_dir(p, trust_code=trust_checkpoint), None
    if not (p / "plan.json").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(f"{p} is not a pruned-model directory (needs plan.json and model.safetensors)")
    try:
        plan = json.loads((p / "plan.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p / 'plan.json'} is not valid JSON: {e}") from None
    lm = load_model(plan["base"], trust_checkpoint=trust_checkpoint)
    on_change = renumber_attention_layers if lm.family == "causal_lm" else None
    pruner = replay_plan(plan, lm.model, lm.example_inputs, lm.forward_fn, on_change=on_change)
    if (p / "sparsity.json").is_file():
        from ..sparsity.sparsify import add_biases
        add_biases(lm.model, json.loads((p / "sparsity.json").read_text()).get("added_bias", []))
    missing, unexpected = st_load_model(lm.model, str(p / "model.safetensors"), strict=True)
    lm.model.eval()
    return lm, pruner
