"""Prune(f): identity replacement, width reconciliation, FindAct/FindNorm, attention collapse,
identity patching, and plans."""
from .engine import Candidate, DepthPruner, Step, count_params
from .reconcile import magnitude_score

__all__ = ["DepthPruner", "Candidate", "Step", "count_params", "magnitude_score"]
