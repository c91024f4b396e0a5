"""Evaluation of causal LMs: held-out perplexity, parameters, speed against the dense base."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..depth.engine import count_params
from .speed import SpeedSettings, lm_speed, tensor_bytes, threads
from .text import perplexity

#: Perplexity protocol: consecutive non-overlapping windows from the start of the text.
PPL_WINDOW, PPL_MAX_WINDOWS = 256, 16


def perplexity_entry(model: nn.Module, tokenizer: Any, text: str, text_spec: str,
                     window: int = PPL_WINDOW, max_windows: int = PPL_MAX_WINDOWS) -> dict:
    """Perplexity with the protocol it was measured under (window = stride: no overlap)."""
    value = perplexity(model, tokenizer, text, seq_len=window, max_windows=max_windows)
    return {"text": text_spec, "window": window, "stride": window, "max_windows": max_windows, "value": value}


def speed_entry(pruned: nn.Module, dense: nn.Module | None, vocab: int, settings: SpeedSettings | None = None,
                progress: bool = True) -> dict:
    """Prefill/decode speed of the pruned model and, measured interleaved in the same run, of the
    dense base architecture; ratios are dense time / pruned time (> 1: the pruned model is faster)."""
    models = {"pruned": pruned} if dense is None else {"pruned": pruned, "dense": dense}
    s = settings or SpeedSettings()
    res = lm_speed(models, vocab, s, progress)
    speedup = {}
    if dense is not None:
        speedup = {k: (res["dense"][k] / res["pruned"][k] if k.startswith("prefill")  # seconds
                       else res["pruned"][k] / res["dense"][k])  # tokens per second
                   for k in res["pruned"]}
    out = {"threads": threads(), "repeats": s.repeats, "warmup": s.warmup,
           "decode": {"prompt": s.decode_prompt, "tokens": s.decode_tokens}, **res}
    out["pruned"]["weights_bytes"] = tensor_bytes(pruned)
    if dense is not None:
        out["dense"]["weights_bytes"] = tensor_bytes(dense)
        out["speedup"] = speedup
    return out


def params_entry(pruned: nn.Module, dense: nn.Module | None) -> dict:
    out = {"params": count_params(pruned)}
    if dense is not None:
        out["dense_params"] = count_params(dense)
        out["reduction"] = 1 - out["params"] / out["dense_params"]
    return out
