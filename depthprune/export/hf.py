"""``--format hf``: a plain Hugging Face checkpoint of a model whose plan removed whole blocks.

Any Hugging Face causal LM with a stack of decoder blocks (`depthprune.blocks.find_blocks`): a
block is removed when every unit in it was pruned (it holds no parameters, only stand-ins, and
passes its input on); every other block must hold no stand-in. The kept decoder layers are
renumbered, ``num_hidden_layers`` is reduced and per-layer config lists (``layer_types``, ...)
are trimmed, so ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it with nothing else. The
checkpoint is written by transformers' own ``save_pretrained`` from a model built on the meta
device and given the pruned tensors (no copy), which also checks every key and shape against
what ``from_pretrained`` will build.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocks import find_blocks
from ..depth.identity import PrunedModule
from ..errors import UserError
from .result import ExportResult


@dataclass
class HFPlan:
    layers_path: str  # the ModuleList of decoder blocks, e.g. model.layers
    blocks: int  # blocks before the export
    kept: list[int]
    config: object  # the exported PretrainedConfig


def read_stack(model: torch.nn.Module) -> tuple[str, int, list[int], list[str]]:
    """``(layers path, number of blocks, removed blocks, problems)`` of a pruned causal LM: the
    removed blocks hold stand-ins and no parameter; a problem is a stand-in anywhere else
    (``PATH (state)``)."""
    blocks = find_blocks(model)
    layers_path = blocks[0][0].rsplit(".", 1)[0] if blocks else ""
    if not blocks or [p for p, _ in blocks] != [f"{layers_path}.{i}" for i in range(len(blocks))]:
        raise UserError("the hf format needs a Hugging Face causal LM with one stack of decoder blocks")
    removed, problems, inside = [], [], set()
    for i, (path, block) in enumerate(blocks):
        stand_ins = [f"{path}.{n} ({m.state})" for n, m in block.named_modules() if isinstance(m, PrunedModule)]
        inside.update(id(m) for m in block.modules())
        if stand_ins and not any(True for _ in block.parameters()):
            removed.append(i)
        else:
            problems += stand_ins
    problems += [f"{n} ({m.state})" for n, m in model.named_modules()
                 if isinstance(m, PrunedModule) and id(m) not in inside]
    return layers_path, len(blocks), removed, problems


def _refuse(problems: list[str]) -> UserError:
    return UserError("the hf format holds whole decoder blocks only; these pruned or narrowed units are in blocks "
                     f"that stay: {', '.join(problems)} (use --format nemotron-nas or --format depthprune)")


def exported_config(config, kept: list[int], old_layers: int):
    """A copy of ``config`` for the kept layers: ``num_hidden_layers`` reduced, every per-layer
    list trimmed to ``kept`` (a list of length ``old_layers`` whose name says layer or block:
    ``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...; not e.g. ``eos_token_id``),
    the KV cache enabled again."""
    cfg = copy.deepcopy(config)
    for key, value in cfg.to_dict().items():
        if isinstance(value, list) and len(value) == old_layers and ("layer" in key or "block" in key):
            setattr(cfg, key, [value[i] for i in kept])
    cfg.num_hidden_layers = len(kept)
    cfg.use_cache = True
    return cfg


def _renamed_state(model: torch.nn.Module, layers_path: str, kept: list[int]) -> dict:
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = layers_path + "."
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) not in new_index:
                continue
            key = f"{prefix}{new_index[int(idx)]}.{rest}"
        out[key] = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return out


def plan_export(lm) -> HFPlan:
    model = lm.model
    layers_path, n, removed, problems = read_stack(model)
    if problems:
        raise _refuse(problems)
    kept = [i for i in range(n) if i not in removed]
    if not kept:
        raise UserError("every decoder block is removed; the hf format needs at least one")
    cfg = exported_config(model.config, kept, n)
    # the exact keys and shapes from_pretrained will build, checked before anything is written
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in _renamed_state(model, layers_path, kept).items()}
    wrong = sorted({k for k in want.keys() | have.keys() if want.get(k) != have.get(k)})
    if wrong:
        raise _refuse([f"{k} ({have.get(k, 'missing')} vs {want.get(k, 'unexpected')})" for k in wrong[:8]])
    return HFPlan(layers_path, n, kept, cfg)


def write_export(lm, plan: HFPlan, out: Path) -> ExportResult:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model = lm.model
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(plan.config, dtype=dtype)
    target.load_state_dict(_renamed_state(model, plan.layers_path, plan.kept), strict=True, assign=True)
    target.tie_weights()  # assign gave the tied head its own Parameter object
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    target.save_pretrained(out)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out)
    removed = [i for i in range(plan.blocks) if i not in plan.kept]
    params = sum(p.numel() for p in {id(p): p for p in target.parameters()}.values())
    notes = [f"removed blocks {removed}; {len(plan.kept)} of {plan.blocks} decoder layers kept, renumbered"]
    return ExportResult(out, "hf", sorted(p.name for p in out.iterdir()), notes, params, 0)
