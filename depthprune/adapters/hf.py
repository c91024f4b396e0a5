"""Hugging Face causal LMs (Llama family): loading, example inputs, KV-cache bookkeeping."""
from __future__ import annotations

import contextlib
import json
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..depth.identity import PrunedModule
from ..errors import SpecError, UserError, one_line
from ..placement import input_device
from ..integrity import cached_dir, check_safetensors
from ..layers.structure import structure_of
from ..progress import status
from . import hf_remote
from .base import Family, LoadedModel, context_length
from .hf_remote import renumber_attention_layers
from .packaged import cache_dir, smollm2_gguf
from .recipes import load_recipe
from .spec import check_remote_code, hub_cached, hub_offline
from .text import load_texts
from .tokens import calibration_batches, mixed_windows, tokenizer_of

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
    if tokenizer is not None and input_ids is None and not _usable_tokenizer(tokenizer, model.config.vocab_size):
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
    return LoadedModel(model=model, example_inputs=(ids,), spec=spec, adapter=CAUSAL_LM,
                       forward_fn=_lm_forward, tokenizer=tokenizer, recipe=load_recipe("llama"), loss_fn=lm_loss,
                       on_change=after_change, logits_fn=_lm_forward, nll_fn=batch_nll, kv_cache_fn=kv_cache_bytes)


@torch.no_grad()
def kv_cache_bytes(model: nn.Module, tokens: int = 2) -> float:
    """Bytes the model's KV cache holds per token: every tensor of the cache a forward of
    ``tokens`` tokens fills (a layer whose attention was pruned away stores nothing), divided by
    ``tokens``."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device=input_device(model))
    out = model(input_ids=ids, use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")  # the newer name, then the older
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers' Cache objects: one entry per layer, empty ones unset
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:  # the legacy tuple of (key, value) per layer
        tensors = [t for kv in (cache or ()) for t in (kv or ())]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / tokens


def batch_nll(logits: torch.Tensor, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of a calibration batch ``(input_ids,)`` and the number of tokens."""
    return logits_nll(logits, batch[0], "sum"), batch[0][:, 1:].numel()


def after_change(model: nn.Module) -> None:
    """After a structural change: KV-cache indices renumbered, and `save_pretrained` writes the
    depthprune format (the base architecture's own `save_pretrained` would write a checkpoint
    that `from_pretrained` silently fills with random weights where layers were removed)."""
    renumber_attention_layers(model)
    model.save_pretrained = types.MethodType(save_pruned_pretrained, model)


def save_pruned_pretrained(model: nn.Module, save_directory, **kwargs) -> None:
    """`save_pretrained` of a pruned transformers model: the depthprune format
    (`depthprune.adapters.hf_remote`), loadable with ``trust_remote_code=True``."""
    from safetensors.torch import save_model
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    structure = {**structure_of(model, lambda m: isinstance(m, PrunedModule), lambda m: m.spec()),
                 "base": describe(model)}
    save_model(model, str(out / "model.safetensors"))
    (out / "structure.json").write_text(json.dumps(structure, indent=1))
    hf_remote.write_files(model, structure, out)


def describe(model: nn.Module) -> dict:
    """The architecture of a transformers model as data (its class name and configuration)."""
    return {"kind": "transformers", "architecture": type(model).__name__, "config": model.config.to_dict()}


def text_calibration(lm: LoadedModel, text_spec: str, samples: int, seq_len: int, batch_size: int) -> list:
    """``samples`` windows of ``seq_len`` tokens of ``text_spec`` (several comma-separated texts:
    equal shares, `mixed_windows`), in batches of ``batch_size``."""
    ctx = context_length(lm)
    if ctx is not None and seq_len > ctx:
        raise UserError(f"--seq-len {seq_len} is longer than {lm.spec}'s context of {ctx} tokens; "
                        f"use --seq-len {ctx} or less")
    return calibration_batches(mixed_windows(tokenizer_of(lm), load_texts(text_spec), samples, seq_len), batch_size)


def build(desc: dict, directory: Path, trust_code: bool = False, empty: bool = True) -> LoadedModel:
    """A transformers model of the described architecture with empty (meta) weights, or randomly
    initialised ones (``empty=False``), and the tokenizer saved in ``directory`` when there is one.
    Only transformers' own classes are built."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, PreTrainedModel
    cfg = dict(desc.get("config") or {})
    model_type = cfg.pop("model_type", None)
    cls = getattr(transformers, str(desc.get("architecture")), None)
    if not isinstance(cls, type) or not issubclass(cls, PreTrainedModel) or not isinstance(model_type, str):
        raise SpecError(f"{directory}: unknown transformers architecture {desc.get('architecture')!r}")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise SpecError(f"{directory}: cannot rebuild the {model_type} configuration: {e}") from None
    if empty:
        try:  # transformers >= 5: skip initialising weights that the directory's weights replace
            from transformers.initialization import no_init_weights
        except ImportError:  # pragma: no cover - older transformers
            from contextlib import nullcontext as no_init_weights
        with init_empty_weights(include_buffers=False), no_init_weights():
            model = cls(config)
    else:
        model = cls(config)
    tokenizer = None
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tokenizer = LazyTokenizer(directory)
    # random example ids: loading the tokenizer (seconds for a large vocabulary) waits until it is used
    g = torch.Generator().manual_seed(0)
    return wrap(model, str(directory), tokenizer, input_ids=torch.randint(0, config.vocab_size, (1, 16), generator=g))


class LazyTokenizer:
    """The tokenizer saved in an output directory, loaded on first use (never with the directory's
    own code: its config.json names modeling_depthprune.py, which tokenizers do not need)."""

    def __init__(self, directory: Path):
        self._directory, self._tokenizer = Path(directory), None

    def _load(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the directory's model type is depthprune's, not the tokenizer's
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self._directory), trust_remote_code=False)
            finally:
                hf_logging.set_verbosity(level)
        return self._tokenizer

    def load(self):
        """The transformers tokenizer itself (for libraries that check its type, e.g. lm-eval)."""
        return self._load()

    def __call__(self, *args, **kwargs):
        return self._load()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._load(), name)


def write_files(lm: LoadedModel, structure: dict, out: Path) -> None:
    """The depthprune-format Hugging Face files of a pruned model, and its tokenizer."""
    hf_remote.write_files(lm.model, structure, out)
    if lm.tokenizer is not None and hasattr(lm.tokenizer, "save_pretrained"):
        lm.tokenizer.save_pretrained(str(out))

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
    return LoadedModel(model=model.eval(), example_inputs=inputs, spec=spec, forward_fn=_primary_output)


def _from_pretrained(path: str, gguf_file: str | None = None, trust_code: bool = False, local_only: bool = False,
                     dtype: torch.dtype | None = None):
    """Model and tokenizer of a Hugging Face directory, hub id or GGUF file. Every transformers
    call says ``trust_remote_code`` explicitly (True only with ``trust_code``): transformers would
    otherwise ask on the terminal whether to run code shipped with the model. ``local_only``
    reads the local Hugging Face cache and never the network."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _quiet_hub()
    kw: dict = {"gguf_file": gguf_file} if gguf_file else {}
    kw.update(trust_remote_code=bool(trust_code) and not gguf_file, local_files_only=local_only)
    # the checkpoint's own dtype unless one is asked for; a GGUF is de-quantized to float32
    kw["dtype"] = dtype if dtype is not None else (torch.float32 if gguf_file else "auto")
    what = f"{path}/{gguf_file}" if gguf_file else path
    with _hub_offline(local_only):
        return _load_pretrained(path, gguf_file, trust_code, local_only, kw, what)


def _load_pretrained(path: str, gguf_file: str | None, trust_code: bool, local_only: bool, kw: dict, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file:
        from transformers import PretrainedConfig
        try:
            cfg, _ = PretrainedConfig.get_config_dict(path, local_files_only=local_only)
        except UserError:
            raise
        except Exception as e:  # missing, unreachable or damaged
            where = " from the local cache" if local_only else ""
            raise SpecError(f"cannot load Hugging Face model {what!r}{where}: {one_line(e)}") from None
        if isinstance(cfg, dict):
            check_remote_code(cfg, path, trust_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except UserError:
        raise
    except Exception as e:  # transformers raises many kinds for missing, invalid or damaged models
        if not trust_code and "trust_remote_code" in str(e):
            raise SpecError(f"{what}: loading it runs code that comes with the model; pass --trust-code only if you "
                            "trust that code") from None
        kind = None if gguf_file else _not_causal(path)
        if kind:
            raise SpecError(f"{what!r} is a {kind} model, not a causal language model: a Hugging Face model given "
                            "by path or id must be one; wrap any other model in a python:MODULE:CALLABLE spec "
                            "that returns (model, example inputs) (docs/guide.md)") from None
        if gguf_file:
            raise SpecError(f"cannot load GGUF file {what!r}: {one_line(e)}") from None
        raise SpecError(f"cannot load Hugging Face model {what!r}: {one_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kw.items() if k != "dtype"})
    except Exception as e:  # no (or no usable) tokenizer files: the model is still a model
        warnings.warn(f"{what}: no usable tokenizer ({one_line(e, 120)}); using random token ids as example "
                      "inputs and a byte tokenizer for text", stacklevel=4)
        tok = None
    return model, tok


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's offline mode while ``offline``: no request at all, not even the ones it
    makes besides the files asked for (``local_files_only`` alone still fetches its own registries)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        constants = None
    if not offline or constants is None or constants.HF_HUB_OFFLINE:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _quiet_hub() -> None:
    """huggingface_hub's retry warnings ("Retrying in 8s [Retry 4/5]") off: one error line, not eleven."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    hub_logging.set_verbosity_error()


def _not_causal(path: str) -> str | None:
    """The ``model_type`` of a local Hugging Face directory whose architecture transformers
    knows but has no causal-LM head for (an encoder, a vision or speech model), else None."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    known = isinstance(kind, str) and kind in CONFIG_MAPPING
    return kind if known and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def _dequantized(model: nn.Module) -> nn.Module:
    """A GGUF model is loaded de-quantized to fp32 but still flagged as quantized, which
    blocks `save_pretrained`; drop the flag (the weights are plain tensors)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf(path: str, spec: str, progress: bool = True) -> LoadedModel:
    """A ``.gguf`` file, de-quantized to fp32 (parsing takes about 15 s per 100M parameters)."""
    p = Path(path)
    status(f"loading {p.name} (de-quantizing GGUF to fp32; slow for large files)", progress)
    model, tok = _from_pretrained(str(p.parent), gguf_file=p.name)
    return wrap(_dequantized(model), spec, tok)


def load_smollm2(spec: str = "smollm2-135m", progress: bool = True, dtype: torch.dtype | None = None) -> LoadedModel:
    """The packaged SmolLM2-135M, converted once from GGUF to safetensors in the user cache.
    The cache entry carries a checksum manifest and is rebuilt when it does not match."""

    def build(staging: Path) -> None:
        gguf = smollm2_gguf()
        status(f"converting the packaged SmolLM2-135M from GGUF to safetensors in {cache_dir()} "
               "(once, about 15 s)", progress)
        model, tok = _from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _dequantized(model)
        model.save_pretrained(staging)
        tok.save_pretrained(staging)

    def adopt(entry: Path) -> None:  # converted before cache entries had manifests
        if not (entry / "config.json").is_file():
            raise UserError("config.json is missing")
        check_safetensors(entry / "model.safetensors")

    target = cached_dir(cache_dir() / "models" / "smollm2-135m", build, "the SmolLM2-135M conversion", adopt)
    model, tok = _from_pretrained(str(target), dtype=dtype)
    return wrap(model, spec, tok)


def load_hf(spec: str, trust_code: bool = False, dtype: torch.dtype | None = None) -> LoadedModel:
    """A Hugging Face directory or hub id. A hub id in the local cache is read from there without
    the network (offline first); only one that is not, or not completely, goes to the hub."""
    if not Path(spec).exists() and hub_cached(spec):
        try:
            model, tok = _from_pretrained(spec, trust_code=trust_code, local_only=True, dtype=dtype)
            return wrap(model, spec, tok)
        except SpecError:
            if hub_offline():
                raise
    model, tok = _from_pretrained(spec, trust_code=trust_code, dtype=dtype)
    return wrap(model, spec, tok)


#: Hugging Face causal language models (next-token text: calibration, evaluation, distillation)
CAUSAL_LM = Family("causal_lm", "transformers", data="text", formats=("hf", "nemotron-nas", "depthprune"),
                   describe=lambda lm: describe(lm.model), write_files=write_files,
                   calibration=text_calibration)
