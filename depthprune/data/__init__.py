"""Datasets the project makes itself (no download): a synthetic detection set."""
from .synth_detect import make_synth_detect

__all__ = ["make_synth_detect"]
