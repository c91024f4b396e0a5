"""What a pruned Llama-style decoder stack looks like, block by block, read from its modules.

A Llama-style decoder layer has ``input_layernorm -> self_attn`` and
``post_attention_layernorm -> mlp(gate_proj, up_proj, act_fn, down_proj)``, each added to the
residual stream. Pruning leaves stand-ins (`PrunedModule`, ``.state`` identity/zero/one/empty)
and narrower ``nn.Linear`` layers behind; this module says, for each block, whether its
attention and its MLP are live (and how wide the MLP is) or removed (their residual operand
patched to Zero), and lists every pruned or narrowed unit that no such state explains.
Only the modules are read (not the plan), so any way of arriving at the structure is covered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..blocks import find_blocks
from ..depth.identity import PrunedModule
from ..errors import UserError

LIVE, REMOVED = "live", "removed"
MLP_PARTS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn")


@dataclass(frozen=True)
class BlockLayout:
    """One decoder block. ``attention``/``ffn``: `LIVE` or `REMOVED`; ``ffn_width``: the
    intermediate width of a live MLP; ``problems``: pruned or narrowed units that neither state
    explains (the block then has no standard form)."""

    index: int
    path: str
    attention: str
    ffn: str
    ffn_width: int | None
    problems: tuple[str, ...]

    @property
    def removed(self) -> bool:
        return self.attention == REMOVED and self.ffn == REMOVED and not self.problems


@dataclass(frozen=True)
class StackLayout:
    """The decoder stack: ``layers_path`` (e.g. ``model.layers``), one `BlockLayout` per block,
    and ``problems`` outside the blocks."""

    layers_path: str
    blocks: tuple[BlockLayout, ...]
    problems: tuple[str, ...]

    def all_problems(self) -> list[str]:
        return [p for b in self.blocks for p in b.problems] + list(self.problems)


def _state(m: nn.Module) -> str | None:
    return m.state if isinstance(m, PrunedModule) else None


def _get(layer: nn.Module, rel: str) -> nn.Module | None:
    try:
        return layer.get_submodule(rel)
    except AttributeError:
        return None


def _linear_problem(path: str, m: nn.Module, want: tuple[int, int], bias_ok: bool) -> str | None:
    if not isinstance(m, nn.Linear):
        return f"{path} ({_state(m) or type(m).__name__})"
    if (m.in_features, m.out_features) != want:
        return f"{path} (width {m.in_features}->{m.out_features}, the format needs {want[0]}->{want[1]})"
    if m.bias is not None and not bias_ok:
        return f"{path} (has a bias, e.g. added by sparsify's bias correction)"
    return None


def _block_layout(index: int, path: str, layer: nn.Module, cfg) -> BlockLayout:
    hidden = cfg.hidden_size
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attn_bias, mlp_bias = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    problems: list[str] = []
    explained: set[str] = set()

    attn = _get(layer, "self_attn")
    if _state(attn) == "zero":
        attention = REMOVED
        explained |= {"self_attn", "input_layernorm"}
    else:
        attention = LIVE
        if _state(attn) is not None:
            problems.append(f"{path}.self_attn ({attn.state}: its output is still added to the residual stream)")
            explained.add("self_attn")
        else:
            for name, want in (("q_proj", (hidden, heads * head_dim)), ("k_proj", (hidden, kv * head_dim)),
                               ("v_proj", (hidden, kv * head_dim)), ("o_proj", (heads * head_dim, hidden))):
                m = _get(attn, name)
                p = _linear_problem(f"{path}.self_attn.{name}", m, want, attn_bias) if m is not None else \
                    f"{path}.self_attn.{name} (missing)"
                if p:
                    problems.append(p)

    down = _get(layer, "mlp.down_proj")
    width = None
    if _state(down) == "zero":
        ffn = REMOVED
        explained |= {"post_attention_layernorm", "mlp", *MLP_PARTS}
    else:
        ffn = LIVE
        gate, up = _get(layer, "mlp.gate_proj"), _get(layer, "mlp.up_proj")
        if not all(isinstance(m, nn.Linear) for m in (gate, up, down)):
            explained |= set(MLP_PARTS)
            problems += [f"{path}.{rel} ({_state(m)})" for rel, m in
                         (("mlp.gate_proj", gate), ("mlp.up_proj", up), ("mlp.down_proj", down),
                          ("mlp.act_fn", _get(layer, "mlp.act_fn"))) if _state(m) is not None]
        else:
            width = gate.out_features
            for rel, m, want in (("mlp.gate_proj", gate, (hidden, width)), ("mlp.up_proj", up, (hidden, width)),
                                 ("mlp.down_proj", down, (width, hidden))):
                p = _linear_problem(f"{path}.{rel}", m, want, mlp_bias)
                if p:
                    problems.append(p)

    # every stand-in left that no state above explains
    for rel, m in layer.named_modules():
        if rel and isinstance(m, PrunedModule) and not any(rel == e or rel.startswith(e + ".") for e in explained):
            problems.append(f"{path}.{rel} ({m.state})")
    return BlockLayout(index, path, attention, ffn, width, tuple(dict.fromkeys(problems)))


def read_layout(model: nn.Module) -> StackLayout:
    """The per-block layout of a (pruned) Llama-style causal LM.

    Raises:
        UserError: the model has no Llama-style decoder layers.
    """
    cfg = getattr(model, "config", None)
    blocks = find_blocks(model)
    if cfg is None or not blocks or not all(_get(b, "self_attn") is not None and _get(b, "mlp") is not None
                                            for _, b in blocks):
        raise UserError("this export needs a Hugging Face causal LM with Llama-style decoder layers "
                        "(self_attn, mlp.gate_proj/up_proj/down_proj)")
    layers_path = blocks[0][0].rsplit(".", 1)[0]
    layouts = tuple(_block_layout(i, p, b, cfg) for i, (p, b) in enumerate(blocks))
    outside = [f"{n} ({m.state})" for n, m in model.named_modules()
               if isinstance(m, PrunedModule) and not n.startswith(layers_path + ".")]
    return StackLayout(layers_path, layouts, tuple(outside))
