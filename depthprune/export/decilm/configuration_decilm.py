"""Configuration of a DeciLM ("nemotron-nas") causal LM: a Llama whose blocks differ.

Written for depthprune's ``nemotron-nas`` exports and shipped inside each exported directory
(``auto_map``), so it needs transformers and nothing else. Every block has an attention part
and an FFN part; ``block_configs`` says, per block, whether each is a no-op (skipped: the
residual stream passes unchanged) and how wide the FFN is (``ffn_mult``, turned into a width by
`ffn_width`, the formula every nemotron-nas reader uses). The block configs are parsed into
small frozen dataclasses, read by attribute (``config.block_configs[i].ffn.ffn_mult``) as
vLLM, SGLang and TensorRT-LLM do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """FFN intermediate width of a block: ``int(2 * ffn_mult * hidden_size / 3)`` rounded up to
    a multiple of 256 (the DeciLM reference formula)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


@dataclass(frozen=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None  # query heads per key/value head

    def __post_init__(self):
        if not (self.no_op or self.replace_with_linear) and not self.n_heads_in_group:
            raise ValueError("a live attention block needs n_heads_in_group")


@dataclass(frozen=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None

    def __post_init__(self):
        if not (self.no_op or self.replace_with_linear) and self.ffn_mult is None:
            raise ValueError("a live FFN block needs ffn_mult")


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, d: dict) -> "BlockConfig":
        known = {"no_op", "replace_with_linear", "n_heads_in_group", "ffn_mult"}
        attn = {k: v for k, v in d.get("attention", {}).items() if k in known}
        ffn = {k: v for k, v in d.get("ffn", {}).items() if k in known}
        return cls(AttentionConfig(**attn), FFNConfig(**ffn))

    def to_dict(self) -> dict:
        return asdict(self)


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, hidden_act: str = "silu", rms_norm_eps: float = 1e-6,
                 max_position_embeddings: int = 2048, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                 attention_bias: bool = False, mlp_bias: bool = False, block_configs: list | None = None,
                 use_cache: bool = True, tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b)
                              for b in (block_configs or [])]
        if self.block_configs and len(self.block_configs) != num_hidden_layers:
            raise ValueError(f"{len(self.block_configs)} block_configs for {num_hidden_layers} layers")
        kwargs.pop("rope_parameters", None)  # derived from rope_theta / rope_scaling below
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # transformers 5 reads `rope_parameters` (and aliases `rope_scaling` to it); older versions
        # and some readers read `rope_scaling`
        self.rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
        if not isinstance(getattr(type(self), "rope_scaling", None), property):
            self.rope_scaling = rope_scaling
        self.head_dim = hidden_size // num_attention_heads

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["block_configs"] = [b.to_dict() for b in self.block_configs]
        rope = dict(d.pop("rope_parameters", None) or {})
        d["rope_theta"] = rope.pop("rope_theta", self.rope_theta)
        d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        d.pop("head_dim", None)
        return d
