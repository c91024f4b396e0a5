"""Plans: the record of every applied operation, replayable on a fresh base model.

A plan names its base model by spec (data, never code) and fingerprint, and lists the BN folds
and steps. Saving and loading output directories lives in `depthprune.io.model_dir`
(``save_pruned``, ``load_pruned``, ``open_model``; the names are still importable from here).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch.nn as nn

from ..errors import UserError
from ..formats import PLAN_FORMAT
from .engine import DepthPruner


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


def base_plan(spec: str, model: nn.Module, recipe: dict | None = None) -> dict:
    """The plan of an unpruned model (no steps): what a sparsified dense model is saved with."""
    return {"format": PLAN_FORMAT, "base": spec, "fingerprint": fingerprint(model), "recipe": recipe or {},
            "folds": [], "steps": []}
