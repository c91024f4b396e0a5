"""Evaluation: calibration windows, perplexity, parameter counts."""
from .text import ByteTokenizer, calibration_batches, perplexity, token_windows, tokenizer_of

__all__ = ["ByteTokenizer", "calibration_batches", "perplexity", "token_windows", "tokenizer_of"]
