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
from ..depth.identity import PrunedModule
from ..layers import structure as structure_mod

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
             inspect.getsource(renumber_attention_layers)]
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


def renumber_attention_layers(model: nn.Module) -> None:
    """Give the attention modules that still compute contiguous cache indices 0..k-1.

    HF caches keep one slot per ``layer_idx`` and read the sequence length from slot 0; when an
    attention operation (or a whole layer) is pruned away, its slot would stay empty. Where the
    config gives each layer a kind (``layer_types``: Gemma 2/3's sliding and full attention, read
    by position for the masks and by slot for the cache), each live attention takes the first
    free slot of its own kind instead, so slot and attention agree; when no live attention has
    layer 0's kind left, slot 0 (where the cache reads the sequence length) takes the kind of the
    first live one (``config.layer_types[0]`` changes with it; the dense list is kept on the
    model and restored when a pruned attention comes back).
    """
    indexed = [m for m in model.modules()
               if isinstance(getattr(m, "layer_idx", None), int) and not isinstance(m, PrunedModule)]
    ids = {id(m) for m in indexed}
    # a module holding another indexed one (or a stand-in of a pruned one) is a container, such
    # as a decoder layer that keeps its attention's index: it follows its attention's slot
    inner = {id(m): [x for x in m.modules() if x is not m and (id(x) in ids or isinstance(x, PrunedModule))]
             for m in indexed}
    live = [m for m in indexed if not inner[id(m)] and any(True for _ in m.parameters())]  # a stand-in holds none
    live_ids = {id(m) for m in live}
    for m in live:
        if not hasattr(m, "_depthprune_layer"):
            m._depthprune_layer = m.layer_idx  # its index in the dense model
    config = getattr(model, "config", None)
    if not hasattr(model, "_depthprune_layer_types"):
        model._depthprune_layer_types = getattr(config, "layer_types", None)  # the dense model's
    kinds = model._depthprune_layer_types
    if not isinstance(kinds, list) or any(not 0 <= m._depthprune_layer < len(kinds) for m in live):
        kinds = None
    elif live and kinds[0] not in {kinds[m._depthprune_layer] for m in live}:
        # the cache reads the sequence length from slot 0, built as the kind of layer 0, which no
        # live attention has left: slot 0 takes the first live attention's kind (the mask read by
        # position 0 is unused: that position's attention is pruned)
        kinds = [kinds[min(m._depthprune_layer for m in live)]] + kinds[1:]
    if kinds is not None and config.layer_types != kinds:
        config.layer_types = list(kinds)
    # modules of one layer share its slot (a hybrid layer's attention and state-space mixer)
    layers = sorted({m._depthprune_layer for m in live})
    free: dict = {}  # kind -> its cache slots, in order
    for k, kind in enumerate(kinds or [None] * len(layers)):
        free.setdefault(kind, []).append(k)
    slot = {}
    for layer in layers:
        kind = kinds[layer] if kinds else None
        slot[layer] = free[kind].pop(0) if free.get(kind) else layer  # no free slot of its kind: keep its own
    for m in live:
        m.layer_idx = slot[m._depthprune_layer]
    for m in indexed:
        held = [x for x in inner[id(m)] if id(x) in live_ids]
        if held:
            m.layer_idx = held[0].layer_idx
