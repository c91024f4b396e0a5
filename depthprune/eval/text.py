"""Perplexity of a causal LM on held-out text (token windows live with the text adapters)."""
from __future__ import annotations

import math

import torch

from ..adapters.tokens import ByteTokenizer, calibration_batches, token_windows, tokenizer_of  # noqa: F401
from ..errors import UserError
from ..placement import input_device
from ..progress import progress_bar


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 256, max_windows: int = 16,
               progress: bool = True) -> float:
    """Perplexity over consecutive non-overlapping windows of ``seq_len`` tokens from the start
    of ``text`` (at most ``max_windows``); a progress bar on stderr when ``progress``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise UserError(f"evaluation text too short for one window of {seq_len} tokens")
    nll, count = 0.0, 0
    device = input_device(model)
    for w in progress_bar(range(n), desc="perplexity", unit="window", enabled=progress):
        x = ids[w * seq_len:(w + 1) * seq_len + 1].unsqueeze(0).to(device)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        nll += torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        count += seq_len
    return math.exp(nll / count)
