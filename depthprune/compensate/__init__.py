"""Training-free compensation of pruned models (closed-form refits on calibration activations)."""
from .lsq import RefitStats, choose_alpha, fold_fits, refit, residual, ridge_toward
from .writer import Compensator

__all__ = ["Compensator", "RefitStats", "choose_alpha", "fold_fits", "refit", "residual", "ridge_toward"]
