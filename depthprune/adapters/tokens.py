"""Token windows of calibration text, and a byte tokenizer for models that ship none."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..errors import UserError


class ByteTokenizer:
    """For models without a tokenizer (random test models): UTF-8 bytes modulo the vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, return_tensors: str = "pt"):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % self.vocab_size
        return SimpleNamespace(input_ids=ids.unsqueeze(0))


def tokenizer_of(lm):
    """The model's tokenizer, or a byte tokenizer for models that ship none."""
    if lm.tokenizer is not None:
        return lm.tokenizer
    vocab = getattr(getattr(lm.model, "config", None), "vocab_size", None)
    if vocab is None:
        raise UserError(f"{lm.spec} has no tokenizer and no vocabulary size; text calibration needs one")
    return ByteTokenizer(vocab)


def token_windows(tokenizer, text: str, n: int, seq_len: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens spread evenly over ``text`` (deterministic), [n, seq_len]."""
    if n < 1 or seq_len < 2:
        raise UserError(f"need at least 1 calibration sample of at least 2 tokens, got {n} of {seq_len} "
                        "(raise --calib-samples or --seq-len)")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    slots = len(ids) // seq_len
    if slots < n:
        raise UserError(f"the text has {len(ids)} tokens: room for {slots} windows of {seq_len}, "
                        f"{n} requested (lower --calib-samples or --seq-len)")
    starts = torch.linspace(0, slots - 1, n).round().long() * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def mixed_windows(tokenizer, texts: list[str], n: int, seq_len: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens shared equally among ``texts`` (the first ones take
    one more when ``n`` does not divide), each text's spread evenly over it, interleaved so that
    every batch mixes the texts: ``[n, seq_len]``. One text: `token_windows`."""
    if len(texts) == 1:
        return token_windows(tokenizer, texts[0], n, seq_len)
    if n < len(texts):
        raise UserError(f"{len(texts)} calibration texts need at least {len(texts)} samples, got {n} "
                        "(raise --calib-samples)")
    parts = [token_windows(tokenizer, text, n // len(texts) + (i < n % len(texts)), seq_len)
             for i, text in enumerate(texts)]
    order = sorted(((j, i) for i, part in enumerate(parts) for j in range(len(part))))
    return torch.stack([parts[i][j] for j, i in order])


def calibration_batches(windows: torch.Tensor, batch_size: int = 8) -> list[tuple[torch.Tensor]]:
    """Model inputs ``(input_ids,)`` in batches (the LM adapters' forward_fn takes these)."""
    return [(windows[i:i + batch_size],) for i in range(0, len(windows), batch_size)]
