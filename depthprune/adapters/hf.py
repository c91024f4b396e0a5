"""Hugging Face causal LMs (Llama family): loading, example inputs, KV-cache bookkeeping."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import SpecError
from ..graph.kinds import is_transform_module
from .base import LoadedModel
from .packaged import cache_dir, smollm2_gguf

EXAMPLE_TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"


def _lm_forward(model: nn.Module, inputs):
    return model(input_ids=inputs[0], use_cache=False).logits


def next_token_nll(model: nn.Module, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on token ids ``[batch, seq]``."""
    return logits_nll(model(input_ids=ids, use_cache=False).logits, ids, reduction)


def logits_nll(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` ``[batch, seq, vocab]`` for token ids ``[batch, seq]``."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                       reduction=reduction)


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """The calibration loss of a causal LM on a batch ``(input_ids,)``: mean next-token CE."""
    return next_token_nll(model, batch[0])


def random_llama(layers: int = 2, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random Llama (hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               use_cache=False, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def wrap(model: nn.Module, spec: str, tokenizer=None, seq_len: int = 16,
         input_ids: torch.Tensor | None = None) -> LoadedModel:
    """A causal LM ready for depthprune: cache off, example ids (``input_ids``, else the example
    text through ``tokenizer``, else random ids), logits as the traced output."""
    model.config.use_cache = False
    model.eval()
    if tokenizer is not None and not _usable_tokenizer(tokenizer, model.config.vocab_size):
        warnings.warn(f"{spec}: the tokenizer found with the model cannot encode text "
                      "(no tokenizer files?); using random token ids as example inputs", stacklevel=2)
        tokenizer = None
    if input_ids is not None:
        ids = input_ids
    elif tokenizer is not None:
        ids = tokenizer(EXAMPLE_TEXT, return_tensors="pt").input_ids[:, :seq_len]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g)
    return LoadedModel(model=model, example_inputs=(ids,), spec=spec, family="causal_lm",
                       forward_fn=_lm_forward, tokenizer=tokenizer, recipe=load_recipe("llama"), loss_fn=lm_loss)


def _usable_tokenizer(tokenizer, vocab_size: int) -> bool:
    """A tokenizer that encodes the example text into several ids inside the model's vocabulary
    (transformers builds an empty one for a directory without tokenizer files)."""
    ids = tokenizer(EXAMPLE_TEXT).input_ids
    return len(ids) >= 2 and max(ids) < vocab_size


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _primary_output(model: nn.Module, inputs):
    """The first tensor of an HF forward's output (``last_hidden_state``, ``logits``, ...)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.to_tuple()[0] if hasattr(out, "to_tuple") else out


def wrap_user_model(model: nn.Module, inputs, spec: str) -> LoadedModel:
    """An HF model a ``python:`` callable built, with its own example inputs: a causal LM goes
    through `wrap` (cache off, logits traced); any other model traces its first output tensor."""
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs[0]
    causal = model.can_generate() and not getattr(model.config, "is_encoder_decoder", False)
    if causal and isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        return wrap(model, spec, input_ids=ids)
    return LoadedModel(model=model.eval(), example_inputs=inputs, spec=spec, family="generic",
                       forward_fn=_primary_output)


def load_recipe(name: str) -> dict:
    import yaml
    path = Path(__file__).resolve().parents[2] / "models" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _from_pretrained(path: str, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:  # transformers' errors for missing/invalid repos
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"cannot load Hugging Face model {path!r}: {msg}") from None
    return model, tok


def _dequantized(model: nn.Module) -> nn.Module:
    """A GGUF model is loaded de-quantized to fp32 but still flagged as quantized, which
    blocks `save_pretrained`; drop the flag (the weights are plain tensors)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf(path: str, spec: str) -> LoadedModel:
    p = Path(path)
    model, tok = _from_pretrained(str(p.parent), gguf_file=p.name)
    return wrap(_dequantized(model), spec, tok)


def load_smollm2(spec: str = "smollm2-135m") -> LoadedModel:
    """The packaged SmolLM2-135M, converted once from GGUF to safetensors in the user cache."""
    target = cache_dir() / "models" / "smollm2-135m"
    if not (target / "config.json").is_file():
        gguf = smollm2_gguf()
        model, tok = _from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _dequantized(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    model, tok = _from_pretrained(str(target))
    return wrap(model, spec, tok)


def load_hf(spec: str) -> LoadedModel:
    model, tok = _from_pretrained(spec)
    return wrap(model, spec, tok)


def renumber_attention_layers(model: nn.Module) -> None:
    """Give the attention modules that still compute contiguous cache indices 0..k-1.

    HF caches keep one slot per ``layer_idx`` and read the sequence length from slot 0; when an
    attention operation (or a whole layer) is pruned away, its slot would stay empty.
    """
    from ..depth.identity import PrunedModule
    i = 0
    for m in model.modules():
        if hasattr(m, "layer_idx") and isinstance(getattr(m, "layer_idx"), int) and not isinstance(m, PrunedModule):
            if any(is_transform_module(c) for c in m.children()):
                m.layer_idx = i
                i += 1
