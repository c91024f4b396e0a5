"""``--format nemotron-nas``: the DeciLM ``block_configs`` format (``DeciLMForCausalLM``).

Per block, the attention is live (``n_heads_in_group`` query heads per KV head) or a no-op, and
the FFN is live with a width given by ``ffn_mult`` or a no-op; blocks whose attention and FFN
are both removed are dropped and the rest renumbered. Every reader checked derives the FFN width
with the same formula (`ffn_width`: ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of
256; MLX-LM first rounds ``ffn_mult`` to 6 decimals): ``mlx_lm/models/nemotron-nas.py``,
``vllm/model_executor/models/nemotron_nas.py``, ``sglang/srt/models/nemotron_nas.py``,
TensorRT-LLM's ``_torch/models/modeling_nemotron_nas.py`` and llama.cpp's
``convert_hf_to_gguf.py`` (``DeciModel``). A width that is not a multiple of 256 cannot be
produced, so such an MLP is padded with zero rows of ``gate_proj``/``up_proj`` and zero columns
of ``down_proj`` up to the next multiple of 256: ``act(0) * 0 = 0`` contributes nothing, so the
export computes exactly what the pruned model does, at the cost of the padding's parameters
(reported). ``replace_with_linear`` is never written (vLLM and SGLang do not implement it).

The directory carries ``configuration_decilm.py`` / ``modeling_decilm.py`` (``auto_map``) so
plain transformers loads it with ``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .result import ExportResult
from .llama_layout import REMOVED, BlockLayout, StackLayout, read_layout

CODE_DIR = Path(__file__).resolve().parent / "decilm"
CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
ALIGN = 256


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width every nemotron-nas reader derives from ``ffn_mult``."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % ALIGN == 0 else width + ALIGN - width % ALIGN


def padded_width(width: int) -> int:
    """The smallest width >= ``width`` that `ffn_width` can produce (a multiple of 256)."""
    return -(-width // ALIGN) * ALIGN


def ffn_mult_for(width: int, hidden: int) -> float:
    """An ``ffn_mult`` that gives exactly ``width`` (a multiple of 256) in every reader: the
    plain formula, MLX-LM's (``ffn_mult`` rounded to 6 decimals first) and after a JSON round trip."""
    if width % ALIGN or width <= 0:
        raise ValueError(f"no ffn_mult gives width {width}")
    for target in (width, width - ALIGN // 2):  # the natural value, else the middle of the interval
        m = round(3 * target / (2 * hidden), 6)
        if all(ffn_width(x, hidden) == width for x in (m, round(m, 6), float(json.dumps(m)))):
            return m
    raise AssertionError(f"no 6-decimal ffn_mult gives width {width} for hidden {hidden}")


@dataclass
class NASPlan:
    layout: StackLayout
    kept: list[BlockLayout]
    widths: dict[int, tuple[int, int]]  # block index -> (pruned width, exported width)
    config: dict


def _rope(cfg) -> tuple[float, dict | None]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _refuse(problems: list[str]) -> UserError:
    return UserError("the nemotron-nas format cannot express these pruned units (it knows live or removed "
                     f"attention, live or removed MLPs, and MLP widths): {', '.join(problems)} "
                     "(use --format depthprune)")


def plan_export(lm) -> NASPlan:
    model = lm.model
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise UserError(f"the nemotron-nas format is a Llama with per-block structure; this model is "
                        f"{getattr(cfg, 'model_type', type(model).__name__)!r} (use --format depthprune)")
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if (getattr(cfg, "head_dim", None) or hidden // heads) * heads != hidden:
        raise UserError("nemotron-nas readers derive head_dim as hidden_size / num_attention_heads; this model's "
                        f"head_dim {cfg.head_dim} differs (use --format depthprune)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UserError("nemotron-nas readers do not all support attention or MLP biases (use --format depthprune)")
    layout = read_layout(model)
    problems = layout.all_problems()
    if problems:
        raise _refuse(problems)
    kept = [b for b in layout.blocks if not b.removed]
    if not kept:
        raise UserError("every decoder block is removed; nothing to export")
    widths = {b.index: (b.ffn_width, padded_width(b.ffn_width)) for b in kept if b.ffn != REMOVED}
    blocks = []
    for b in kept:
        attention = ({"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
                     if b.attention == REMOVED else
                     {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // kv})
        ffn = ({"no_op": True, "replace_with_linear": False, "ffn_mult": None} if b.ffn == REMOVED else
               {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult_for(widths[b.index][1], hidden)})
        blocks.append({"attention": attention, "ffn": ffn})
    theta, scaling = _rope(cfg)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {
        "architectures": ["DeciLMForCausalLM"], "auto_map": dict(AUTO_MAP), "model_type": "nemotron-nas",
        "vocab_size": cfg.vocab_size, "hidden_size": hidden, "num_hidden_layers": len(kept),
        "num_attention_heads": heads, "hidden_act": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": theta, "rope_scaling": scaling,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "initializer_range": getattr(cfg, "initializer_range", 0.02), "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype, "block_configs": blocks,
    }
    return NASPlan(layout, kept, widths, config)


def padding_cost(plan: NASPlan, hidden: int) -> int:
    """Parameters the zero padding adds: per padded MLP, (exported - pruned width) rows of
    gate_proj and up_proj and columns of down_proj."""
    return sum(3 * hidden * (w_out - w) for w, w_out in plan.widths.values())


def _tensors(model: torch.nn.Module, plan: NASPlan) -> dict[str, torch.Tensor]:
    """The exported state: kept blocks renumbered, removed sublayers' leftovers (e.g. a norm)
    dropped, MLPs zero-padded to their exported width, a tied LM head stored once."""
    prefix = plan.layout.layers_path + "."
    new = {b.index: i for i, b in enumerate(plan.kept)}
    kept = {b.index: b for b in plan.kept}
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            b = kept.get(int(idx))
            if b is None:
                continue
            if b.attention == REMOVED and rest.startswith(("self_attn.", "input_layernorm.")):
                continue
            if b.ffn == REMOVED and rest.startswith(("mlp.", "post_attention_layernorm.")):
                continue
            if b.ffn != REMOVED:
                w, w_out = plan.widths[b.index]
                if w_out != w and rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    t = torch.cat([t, t.new_zeros(w_out - w, t.shape[1])], 0)
                elif w_out != w and rest == "mlp.down_proj.weight":
                    t = torch.cat([t, t.new_zeros(t.shape[0], w_out - w)], 1)
            key = f"{prefix}{new[b.index]}.{rest}"
        elif key == "lm_head.weight" and plan.config["tie_word_embeddings"]:
            continue
        out[key] = t.detach().contiguous()
    return out


def write_export(lm, plan: NASPlan, out: Path) -> ExportResult:
    from safetensors.torch import save_file
    model = lm.model
    tensors = _tensors(model, plan)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, out / name)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out)
    hidden = plan.config["hidden_size"]
    extra = padding_cost(plan, hidden)
    params = sum(t.numel() for t in tensors.values())
    removed = [b.index for b in plan.layout.blocks if b.removed]
    no_attn = [b.index for b in plan.kept if b.attention == REMOVED]
    no_ffn = [b.index for b in plan.kept if b.ffn == REMOVED]
    notes = [f"{len(plan.kept)} of {len(plan.layout.blocks)} blocks kept (dropped {removed}); attention no_op in "
             f"blocks {no_attn}, FFN no_op in blocks {no_ffn} (block numbers of the pruned model)"]
    ffn_only = [b.index for b in plan.kept if b.ffn == REMOVED and b.attention != REMOVED]
    if ffn_only:
        notes.append(f"warning: llama.cpp's DECI graph (src/models/deci.cpp) skips the whole layer when its FFN is a "
                     f"no-op, dropping a live attention's output too: blocks {ffn_only} will be wrong in llama.cpp "
                     "(vLLM, SGLang, TensorRT-LLM, MLX-LM and transformers compute them as exported)")
    padded = {i: ww for i, ww in plan.widths.items() if ww[0] != ww[1]}
    if not padded:
        notes.append("every MLP width is a multiple of 256, as nemotron-nas readers derive them: no padding")
    else:
        pct = 100 * extra / max(1, params - extra)
        notes.append("nemotron-nas readers derive FFN widths as multiples of 256 (llama.cpp, vLLM, MLX-LM alike): "
                     "MLPs zero-padded (exact) in blocks "
                     + ", ".join(f"{i} ({w}->{w_out})" for i, (w, w_out) in sorted(padded.items()))
                     + f": +{extra:,d} parameters (+{pct:.2f} %)")
    return ExportResult(out, "nemotron-nas", sorted(p.name for p in out.iterdir()), notes, params, extra)
