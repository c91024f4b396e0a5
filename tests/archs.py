"""A zoo of tiny config-built models, one per architecture kind the engine must hold on.

``ZOO[name]()`` builds an `Arch`: the model (eval, fp32, random weights), its example inputs,
the forward whose tensor output is traced, its kind (``decoder``, ``encoder``, ``cnn``,
``yolo``) and, for Hugging Face decoders, what the reference checks need (where the blocks
and each block's attention module are, how to build the block-deleted and the
attention-skipped reference models).

Everything is tiny (hidden 64, 3 layers, vocab 128, 16 tokens; 64x64 images) so the whole
battery (`tests/battery.py`) runs in minutes on one core. ``SLOW`` names the heavy entries.

Family names live here on purpose: this is test data, not the library.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="depthprune-tests-yolo-"))
os.environ.setdefault("YOLO_VERBOSE", "False")

VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ = 128, 64, 3, 4, 128, 16
IMAGE = 64


@dataclass
class Arch:
    """One zoo model and what the battery needs to check it."""

    name: str
    kind: str  # decoder, encoder, cnn, yolo
    model: nn.Module
    example_inputs: Any
    forward_fn: Callable[[nn.Module, Any], torch.Tensor]
    recipe: dict = field(default_factory=dict)
    on_change: Callable[[nn.Module], None] | None = None
    #: HF decoders: dotted path of the block list and the attention module's path in a block
    blocks: str | None = None
    attention: str | None = None
    #: the positional argument an attention module that adds its own residual returns when its
    #: sublayer is skipped; None: the sublayer adds zeros
    attention_residual_arg: int | None = None

    def block_path(self, b: int) -> str:
        return f"{self.blocks}.{b}"

    def delete_block(self, b: int) -> nn.Module:
        """A copy of the model whose block ``b`` passes its hidden states through unchanged."""
        return _replaced(self, self.block_path(b), zero=False)

    def skip_attention(self, b: int) -> nn.Module:
        """A copy of the model whose block ``b`` adds nothing from its attention sublayer
        (the attention module returns zeros; a norm after it maps zeros to zeros)."""
        return _replaced(self, f"{self.block_path(b)}.{self.attention}", zero=self.attention_residual_arg is None,
                         arg=self.attention_residual_arg or 0)


class _Passthrough(nn.Module):
    """Returns the hidden-states input (or zeros shaped like it) in the replaced module's
    output structure: a tensor, or a tuple whose other entries are None."""

    def __init__(self, n_outputs: int | None, zero: bool, arg: int = 0):
        super().__init__()
        self.n_outputs, self.zero, self.arg = n_outputs, zero, arg

    def forward(self, *args, **kwargs):
        floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        h = floats[self.arg] if len(floats) > self.arg else kwargs["hidden_states"]
        if self.zero:
            h = torch.zeros_like(h)
        return h if self.n_outputs is None else (h,) + (None,) * (self.n_outputs - 1)


def _replaced(arch: Arch, path: str, zero: bool, arg: int = 0) -> nn.Module:
    ref = copy.deepcopy(arch.model)
    target = ref.get_submodule(path)
    seen = {}
    handle = target.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        arch.forward_fn(ref, arch.example_inputs)
    handle.remove()
    out = seen["out"]
    ref.set_submodule(path, _Passthrough(None if isinstance(out, torch.Tensor) else len(out), zero, arg))
    return ref


# ---------------------------------------------------------------------------- HF decoders
def _hf_decoder(name: str, config_class: str, attention: str, attention_residual_arg: int | None = None,
                **config) -> Arch:
    import transformers
    from transformers import AutoModelForCausalLM

    from depthprune.adapters.hf import renumber_attention_layers, wrap
    from depthprune.blocks import find_blocks

    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(**config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    lm = wrap(model, f"zoo:{name}", seq_len=SEQ)
    blocks = find_blocks(model)
    arch = Arch(name, "decoder", lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe,
                on_change=renumber_attention_layers, blocks=blocks[0][0].rsplit(".", 1)[0], attention=attention,
                attention_residual_arg=attention_residual_arg)
    assert len(blocks) == config.get("num_hidden_layers", config.get("n_layer", LAYERS))
    assert isinstance(model.get_submodule(arch.block_path(0) + "." + attention), nn.Module)
    return arch


def _llama_like(config_class: str, **extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


DECODERS: dict[str, Callable[[], Arch]] = {
    "llama": lambda: _hf_decoder("llama", "LlamaConfig", "self_attn", **_llama_like("LlamaConfig")),
    "qwen2": lambda: _hf_decoder("qwen2", "Qwen2Config", "self_attn", **_llama_like("Qwen2Config")),
    "mistral": lambda: _hf_decoder("mistral", "MistralConfig", "self_attn", **_llama_like("MistralConfig")),
    "gemma": lambda: _hf_decoder("gemma", "GemmaConfig", "self_attn", **_llama_like("GemmaConfig", head_dim=16)),
    "opt": lambda: _hf_decoder("opt", "OPTConfig", "self_attn", vocab_size=VOCAB, hidden_size=HIDDEN,
                               ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               word_embed_proj_dim=HIDDEN, max_position_embeddings=64, pad_token_id=0),
    "gpt2": lambda: _hf_decoder("gpt2", "GPT2Config", "attn", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                n_head=HEADS, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox_parallel": lambda: _hf_decoder("gpt_neox_parallel", "GPTNeoXConfig", "attention", vocab_size=VOCAB,
                                             hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, max_position_embeddings=64,
                                             use_parallel_residual=True),
    "gpt_neox_sequential": lambda: _hf_decoder("gpt_neox_sequential", "GPTNeoXConfig", "attention",
                                               vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                               num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                               max_position_embeddings=64, use_parallel_residual=False),
    "gptj": lambda: _hf_decoder("gptj", "GPTJConfig", "attn", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                n_head=HEADS, rotary_dim=8, n_positions=64, bos_token_id=0, eos_token_id=0),
    "phi": lambda: _hf_decoder("phi", "PhiConfig", "self_attn", vocab_size=VOCAB, hidden_size=HIDDEN,
                               intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               max_position_embeddings=64),
    "phi3": lambda: _hf_decoder("phi3", "Phi3Config", "self_attn", **_llama_like("Phi3Config")),
    "gemma2": lambda: _hf_decoder("gemma2", "Gemma2Config", "self_attn",
                                  **_llama_like("Gemma2Config", head_dim=16, sliding_window=8)),
    "gemma3": lambda: _hf_decoder("gemma3", "Gemma3TextConfig", "self_attn",
                                  **_llama_like("Gemma3TextConfig", head_dim=16, sliding_window=8)),
    "olmo2": lambda: _hf_decoder("olmo2", "Olmo2Config", "self_attn", **_llama_like("Olmo2Config")),
    "falcon": lambda: _hf_decoder("falcon", "FalconConfig", "self_attention", vocab_size=VOCAB, hidden_size=HIDDEN,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS),
    "stablelm": lambda: _hf_decoder("stablelm", "StableLmConfig", "self_attn", **_llama_like("StableLmConfig")),
    "cohere": lambda: _hf_decoder("cohere", "CohereConfig", "self_attn", **_llama_like("CohereConfig")),
    # parallel attention + MLP with two norms
    "falcon_parallel_2norms": lambda: _hf_decoder("falcon_parallel_2norms", "FalconConfig", "self_attention",
                                                  vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                  num_attention_heads=HEADS, new_decoder_architecture=True,
                                                  num_kv_heads=2),
    # parallel, one shared norm, GPT-J style
    "codegen": lambda: _hf_decoder("codegen", "CodeGenConfig", "attn", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                   n_head=HEADS, rotary_dim=8, n_positions=64, n_ctx=64, bos_token_id=0,
                                   eos_token_id=0),
    # attention through baddbmm (ALiBi) that adds its own residual
    "bloom": lambda: _hf_decoder("bloom", "BloomConfig", "self_attention", attention_residual_arg=1, vocab_size=VOCAB,
                                 hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    # scaled residual branches (residual_multiplier)
    "granite": lambda: _hf_decoder("granite", "GraniteConfig", "self_attn", **_llama_like("GraniteConfig")),
    # a learnable element-wise activation (xIELU)
    "apertus": lambda: _hf_decoder("apertus", "ApertusConfig", "self_attn", **_llama_like("ApertusConfig")),
    # attention nested in a wrapper module
    "gpt_neo": lambda: _hf_decoder("gpt_neo", "GPTNeoConfig", "attn.attention", vocab_size=VOCAB, hidden_size=HIDDEN,
                                   num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=64, window_size=8,
                                   attention_types=[[["global", "local"], 1], [["global"], 1]], bos_token_id=0,
                                   eos_token_id=0),
    "gpt_bigcode": lambda: _hf_decoder("gpt_bigcode", "GPTBigCodeConfig", "attn", vocab_size=VOCAB, n_embd=HIDDEN,
                                       n_layer=LAYERS, n_head=HEADS, n_positions=64, bos_token_id=0,
                                       eos_token_id=0),
}


# ---------------------------------------------------------------------------- encoders
def _last_hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def bert() -> Arch:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FFN, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return Arch("bert", "encoder", BertModel(cfg).eval(), {"input_ids": ids}, _last_hidden)


def vit() -> Arch:
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=FFN, image_size=32, patch_size=8, num_channels=3)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Arch("vit", "encoder", ViTModel(cfg).eval(), {"pixel_values": x}, _last_hidden)


ENCODERS: dict[str, Callable[[], Arch]] = {"bert": bert, "vit": vit}


# ---------------------------------------------------------------------------- CNNs
def _plain(model: nn.Module, inputs):
    return model(*inputs)


def _torchvision(name: str, build: Callable[[], nn.Module] | None = None, **kw) -> Arch:
    import torchvision
    torch.manual_seed(0)
    model = (build() if build else getattr(torchvision.models, name)(weights=None, **kw)).eval()
    x = torch.rand(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    return Arch(name, "cnn", model, (x,), _plain)


def _densenet_small() -> nn.Module:
    """DenseNet's own class (dense concatenation, transitions) at a test size: 4 blocks of 3 layers."""
    from torchvision.models import DenseNet
    return DenseNet(growth_rate=8, block_config=(3, 3, 3, 3), num_init_features=16, bn_size=2)


def _resnext_small() -> nn.Module:
    """ResNeXt's own class (grouped 3x3 bottlenecks, 32 groups of 4) with one block per stage."""
    from torchvision.models.resnet import Bottleneck, ResNet
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)


CNNS: dict[str, Callable[[], Arch]] = {
    name: (lambda name=name, kw=kw: _torchvision(name, **kw)) for name, kw in [
        ("resnet18", {}), ("mobilenet_v2", {}), ("mobilenet_v3_small", {}), ("efficientnet_b0", {}),
        ("convnext_tiny", {}), ("regnet_y_400mf", {}), ("shufflenet_v2_x0_5", {}), ("squeezenet1_1", {}),
        ("densenet_small", {"build": _densenet_small}), ("resnext_small", {"build": _resnext_small}),
        ("googlenet", {"aux_logits": False, "init_weights": False}),
    ]
}

#: full-size models of the kinds above, for `bench/architectures.py` (the listing-time figures);
#: the tests use the small builds of the same classes
FULL_SIZE: dict[str, Callable[[], Arch]] = {
    name: (lambda name=name: _torchvision(name)) for name in ("densenet121", "resnext50_32x4d")
}


# ---------------------------------------------------------------------------- YOLO
def _yolo(cfg: str) -> Arch:
    from depthprune.adapters.yolo import load_yolo
    torch.manual_seed(0)
    lm = load_yolo(cfg, imgsz=IMAGE)
    return Arch(cfg.split(".")[0], "yolo", lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)


YOLOS: dict[str, Callable[[], Arch]] = {"yolov5n": lambda: _yolo("yolov5n.yaml"),
                                       "yolov8n": lambda: _yolo("yolov8n.yaml")}

ZOO: dict[str, Callable[[], Arch]] = {**DECODERS, **ENCODERS, **CNNS, **YOLOS}

#: Entries whose battery takes more than ~20 s on one core (marked ``slow`` in the tests).
SLOW = {"convnext_tiny", "densenet_small", "resnext_small", "googlenet", "efficientnet_b0", "regnet_y_400mf",
        "mobilenet_v3_small", "mobilenet_v2", "shufflenet_v2_x0_5", "yolov5n", "yolov8n"}


# ---------------------------------------------------------------------------- python: route
def qwen2_default():
    """A tiny Qwen2 built from its config with every default left alone (``use_cache`` on):
    what a user's ``python:MODULE:CALLABLE`` returns. Returns ``(model, (input_ids,))``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return Qwen2ForCausalLM(cfg).eval(), (ids,)


class _PlainBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class _PlainStack(nn.Module):
    def __init__(self, d: int = 16, depth: int = 4):
        super().__init__()
        self.embed, self.head = nn.Linear(8, d), nn.Linear(d, 3)
        self.blocks = nn.ModuleList(_PlainBlock(d) for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def plain_blocks():
    """A plain PyTorch model with repeated blocks (no Hugging Face, no adapter of its own), as a
    user's ``python:MODULE:CALLABLE`` returns it. Returns ``(model, (x,))``."""
    torch.manual_seed(0)
    return _PlainStack().eval(), (torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)),)


class _PlainSequential(_PlainStack):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*self.blocks)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def plain_sequential():
    """`plain_blocks`' model with its blocks in an ``nn.Sequential`` (as timm and torchvision
    keep theirs): no ``nn.ModuleList`` of repeated blocks. Returns ``(model, (x,))``."""
    torch.manual_seed(0)
    return _PlainSequential().eval(), plain_blocks()[1]
