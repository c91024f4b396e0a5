"""What an output directory's files must be, checked without loading a model (no torch): the
plan's shape, whether its base would run code, the weights file's integrity. The CLI checks a
directory with it in seconds, before anything heavy is imported (`depthprune.io.model_dir`
saves and loads)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..formats import PLAN_FORMAT
from ..integrity import check_safetensors, read_json_file

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
