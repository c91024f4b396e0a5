"""Hugging Face directories in the ``depthprune`` format: a pruned model that transformers loads
with ``trust_remote_code=True`` where depthprune is not installed.

``config.json`` is the base model's configuration with ``model_type: depthprune``, the base
classes' names and the pruned structure (`depthprune.io.structure`); ``auto_map`` points
transformers to ``modeling_depthprune.py``, written here from the sources of the stand-ins, the
structure code and the KV-cache renumbering, so the directory carries every line it runs. Because
the model type is not one transformers knows, ``from_pretrained`` without
``trust_remote_code=True`` refuses the directory instead of silently loading the base
architecture with random weights where layers were removed.
"""
from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import torch.nn as nn

from ..depth import identity as stand_ins
from ..layers import structure as structure_mod
from . import hf as hf_adapter

MODEL_TYPE = "depthprune"
MODELING_FILE = "modeling_depthprune.py"


def _definitions(source: str) -> str:
    """Top-level functions, classes and constants of a module's source, without its docstring
    and imports."""
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign))]
    return "\n\n\n".join(ast.get_source_segment(source, n) for n in keep)


def modeling_source(base_class: str, config_class: str) -> str:
    """The text of ``modeling_depthprune.py`` for a base model class such as LlamaForCausalLM."""
    parts = [_definitions(inspect.getsource(stand_ins)), _definitions(inspect.getsource(structure_mod)),
             inspect.getsource(hf_adapter.renumber_attention_layers)]
    return f'''"""Modeling code of a model depth-pruned by depthprune (written by depthprune; needs only
torch and transformers). The base architecture is {base_class}; ``config.depthprune_structure``
lists the modules replaced by parameter-free stand-ins and the resized ones."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from transformers import {config_class} as _BaseConfig
from transformers import {base_class} as _BaseModel

''' + "\n\n\n".join(parts) + f'''


class DepthpruneConfig(_BaseConfig):
    model_type = "{MODEL_TYPE}"


class DepthpruneForCausalLM(_BaseModel):
    config_class = DepthpruneConfig

    def __init__(self, config):
        super().__init__(config)
        apply_structure(self, config.depthprune_structure, make_stand_in)
        renumber_attention_layers(self)
'''


def config_dict(model: nn.Module, structure: dict) -> dict:
    """``config.json`` of the depthprune format for a pruned transformers model."""
    cfg = model.config.to_dict()
    cfg.update({
        "model_type": MODEL_TYPE,
        "architectures": ["DepthpruneForCausalLM"],
        "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.DepthpruneConfig",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.DepthpruneForCausalLM"},
        "depthprune_base": {"model_type": model.config.model_type, "architecture": type(model).__name__,
                            "config_class": type(model.config).__name__},
        "depthprune_structure": structure,
    })
    return cfg


def write_files(model: nn.Module, structure: dict, out: Path) -> None:
    """Write ``config.json`` and ``modeling_depthprune.py`` into ``out``."""
    base = type(model).__name__
    (out / "config.json").write_text(json.dumps(config_dict(model, structure), indent=1))
    (out / MODELING_FILE).write_text(modeling_source(base, type(model.config).__name__))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
