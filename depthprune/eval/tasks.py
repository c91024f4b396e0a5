"""lm-evaluation-harness tasks on an in-memory model (its Python API; `HFLM` accepts a module).

No dataset hub is reachable here, so tasks are read from local task directories
(``include_path``: lm-eval task YAMLs whose ``dataset_path: json`` points at local files); a
user with a hub names the harness's own tasks the same way.
"""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from ..errors import UserError

INSTALL_HINT = "lm-eval is not installed: pip install 'depthprune[eval]' (or pip install lm-eval)"


def run_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], include_path: str | None = None,
              limit: int | None = None, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Evaluate ``tasks`` with lm-eval; returns ``{task: {metric: value}}`` (stderr entries dropped)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise UserError("lm-eval tasks need the model's tokenizer (this model has none)")
    if callable(getattr(type(tokenizer), "load", None)):  # a tokenizer loaded on first use: lm-eval checks its type
        tokenizer = tokenizer.load()
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--task-dir {include_path} is not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # the harness's own tasks too
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}" +
                        ("" if include_path else " (pass --task-dir DIR for local task files)"))
    device = next((str(t.device) for t in model.parameters()), "cpu")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      log_samples=False, verbosity="ERROR")
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k}
    return out
