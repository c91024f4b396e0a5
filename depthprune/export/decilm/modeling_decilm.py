"""A DeciLM ("nemotron-nas") causal LM for transformers: a Llama whose blocks differ.

Written for depthprune's ``nemotron-nas`` exports and shipped inside each exported directory
(``auto_map``, loaded with ``trust_remote_code=True``); it needs torch and transformers only.
A block whose attention is a no-op has no attention, no input norm and no KV-cache slot: the
attention layers that remain use cache slots 0..k-1 in order, as MLX-LM does. A block whose
FFN is a no-op has no MLP and no post-attention norm. Weight names are Llama's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig, ffn_width

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeciLMRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class DeciLMRotary:
    """Rotary position angles; the inverse frequencies are computed on first use per device
    (no buffer, so nothing to restore after meta-device initialisation)."""

    def __init__(self, config: DeciLMConfig):
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self._cache: dict = {}

    def _inv_freq(self, device) -> tuple[torch.Tensor, float]:
        if device not in self._cache:
            params = self.config.rope_parameters
            if params.get("rope_type", "default") == "default":
                d = self.head_dim
                inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
                self._cache[device] = (inv.to(device), 1.0)
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
                self._cache[device] = ROPE_INIT_FUNCTIONS[params["rope_type"]](self.config, device)
        return self._cache[device]

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv, scale = self._inv_freq(x.device)
        freqs = position_ids[..., None].float() * inv.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class DeciLMAttention(nn.Module):
    def __init__(self, config: DeciLMConfig, n_heads_in_group: int, cache_index: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = self.heads // n_heads_in_group
        self.head_dim = config.hidden_size // self.heads
        self.cache_index = cache_index
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        causal = mask is None and t > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, width: int):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMDecoderLayer(nn.Module):
    def __init__(self, config: DeciLMConfig, index: int, cache_index: int):
        super().__init__()
        block = config.block_configs[index]
        if block.attention.replace_with_linear or block.ffn.replace_with_linear:
            raise ValueError(f"block {index}: replace_with_linear is not supported by this modeling code")
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = None
        if not block.attention.no_op:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = DeciLMAttention(config, block.attention.n_heads_in_group, cache_index)
        if not block.ffn.no_op:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, ffn_width(block.ffn.ffn_mult, config.hidden_size))

    def forward(self, h, cos, sin, mask, cache):
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]

    def _init_weights(self, module):  # only for weights a checkpoint lacks
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, DeciLMRMSNorm):
            nn.init.ones_(module.weight)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, k = [], 0
        for i, block in enumerate(config.block_configs):
            layers.append(DeciLMDecoderLayer(config, i, k))
            k += not block.attention.no_op
        self.layers = nn.ModuleList(layers)
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = DeciLMRotary(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=h.device).unsqueeze(0).expand(b, -1)
        mask = _attention_mask(attention_mask, b, t, past, h.device)
        cos, sin = self.rotary(h, position_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)


def _attention_mask(attention_mask, b: int, t: int, past: int, device):
    """Boolean [b, 1, t, past + t] mask (True = attend), or None when plain causal attention
    (no padding) does; every position may attend to itself, so padded rows stay finite."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or t == 1):
        return None  # causal (t > 1, nothing cached) or everything visible (one new token)
    kv = past + t
    rows = torch.arange(t, device=device)[:, None] + past
    mask = (torch.arange(kv, device=device)[None, :] <= rows)[None, None].expand(b, 1, t, kv)
    if padded:
        keep = attention_mask[:, None, None, -kv:].bool()
        mask = (mask & keep) | (torch.arange(kv, device=device)[None, :] == rows)[None, None]
    return mask


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        h = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None, inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
