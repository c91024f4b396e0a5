"""Intra-layer pruners for surviving layers: magnitude, Wanda, STADE; unstructured and N:M."""
from .metrics import InputStats, bias_correction, nm_mask, unstructured_mask
from .sparsify import METHODS, explain, prune_layer, sparsify

__all__ = ["METHODS", "InputStats", "bias_correction", "explain", "nm_mask", "prune_layer", "sparsify",
           "unstructured_mask"]
