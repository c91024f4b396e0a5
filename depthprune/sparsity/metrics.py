"""Intra-layer pruning metrics and masks: pure functions on tensors.

``W`` is a weight ``[out, in]``; input statistics are per input feature ``j`` over all
calibration tokens. Masks are boolean, ``True`` where a weight is pruned.

- magnitude: ``|W_ij|``
- Wanda: ``|W_ij| * ||X_j||_2``
- STADE: Wanda's metric when the layer's input is centred, else ``|W_ij| * std(X_j)``; plus the
  bias correction ``b_i* = b_i + sum_{j pruned} mu_j W_ij`` (`bias_correction`).
- STADE without bias, as printed (Eq. 12): ``(||X_j - mu_j||_2^2 + mu_j^2) * W_ij^2``. The first
  term is a sum over tokens, the second a mean, so it ranks almost like the standard deviation.
  The consistent form ``(sigma_j^2 + mu_j^2) * W_ij^2 = E[X_j^2] * W_ij^2`` ranks exactly like
  Wanda (`stade_consistent_metric`; pinned by a test).
"""
from __future__ import annotations

import torch

from ..errors import UserError


class InputStats:
    """Count, mean and centred sum of squares per feature, merged batch by batch in float64
    (Chan et al.'s parallel update, no catastrophic cancellation)."""

    def __init__(self, features: int):
        self.count = 0
        self.mean = torch.zeros(features, dtype=torch.float64)
        self.m2 = torch.zeros(features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = (x - mean).pow(2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    @property
    def centred_sq_norm(self) -> torch.Tensor:
        """``||X_j - mu_j||_2^2``."""
        return self.m2

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||_2^2 = ||X_j - mu_j||^2 + N mu_j^2``."""
        return self.m2 + self.count * self.mean.pow(2)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(1, self.count)).sqrt()


def magnitude_metric(W: torch.Tensor) -> torch.Tensor:
    return W.abs()


def wanda_metric(W: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return W.abs() * sq_norm.to(W.dtype).sqrt().unsqueeze(0)


def stade_metric(W: torch.Tensor, stats: InputStats, centred: bool) -> torch.Tensor:
    if centred:
        return wanda_metric(W, stats.sq_norm)
    return W.abs() * stats.std.to(W.dtype).unsqueeze(0)


def stade_nobias_metric(W: torch.Tensor, centred_sq_norm: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """STADE w/o bias exactly as printed (Eq. 12)."""
    return W.pow(2) * (centred_sq_norm + mean.pow(2)).to(W.dtype).unsqueeze(0)


def stade_consistent_metric(W: torch.Tensor, var: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(sigma^2 + mu^2) W^2 = E[X^2] W^2``: ranks exactly like Wanda."""
    return W.pow(2) * (var + mean.pow(2)).to(W.dtype).unsqueeze(0)


def unstructured_mask(metric: torch.Tensor, sparsity: float, extra: int = 0) -> torch.Tensor:
    """Prune the ``int(in * sparsity) + extra`` lowest-metric weights of every output row."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    k = int(metric.shape[1] * sparsity) + extra
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(metric, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(metric: torch.Tensor, n: int, m: int, extra: int = 0) -> torch.Tensor:
    """N:M along the input dimension: the ``n`` lowest of every ``m`` consecutive weights, then
    ``extra`` more per row (the lowest survivors; every group keeps at least ``n`` zeros)."""
    if not 0 < n < m:
        raise UserError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows, cols = metric.shape
    if cols % m:
        raise UserError(f"input width {cols} is not a multiple of M={m}")
    groups = metric.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    if extra:
        rest = metric.masked_fill(mask, float("inf"))
        mask.scatter_(1, torch.topk(rest, extra, dim=1, largest=False).indices, True)
    return mask


def parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise UserError(f"pattern must be N:M with integers, e.g. 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise UserError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def bias_correction(W: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """What STADE adds to the bias: ``sum_{j pruned} mu_j W_ij`` per output ``i``."""
    return (W.double() * mask).matmul(mean.double()).to(W.dtype)
