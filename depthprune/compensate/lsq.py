"""Closed-form least-squares refits: pure functions on tensors (float64).

A linear layer ``W`` (``[out, in]``) whose output enters the model additively is refit so that its
output ``W' z`` matches a target ``r`` over calibration tokens, shrunk toward the current weight:

    W' = argmin  sum_t ||W' z_t - r_t||^2 + lam ||W' - W||_F^2  =  (C + lam W)(G + lam I)^-1,

with the sufficient statistics ``G = sum z z^T`` and ``C = sum r z^T``, and
``lam = alpha * trace(G) / in``. ``alpha`` is chosen by two-fold cross-validation on the
calibration tokens themselves (fit on one fold, measure on the other); when no ``alpha`` beats the
unchanged weight on held-out tokens, nothing is refit. This is what keeps a small calibration set
from overfitting a large layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALPHAS = (0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class RefitStats:
    """Sufficient statistics of ``min ||W' z - r||^2``, kept per fold."""

    d_in: int
    d_out: int
    folds: int = 2
    G: torch.Tensor = field(init=False)
    C: torch.Tensor = field(init=False)
    rr: torch.Tensor = field(init=False)
    n: torch.Tensor = field(init=False)
    _eig: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        f = self.folds
        self.G = torch.zeros(f, self.d_in, self.d_in, dtype=torch.float64)
        self.C = torch.zeros(f, self.d_out, self.d_in, dtype=torch.float64)
        self.rr = torch.zeros(f, dtype=torch.float64)
        self.n = torch.zeros(f, dtype=torch.long)
        self._eig = {}

    def add(self, z: torch.Tensor, r: torch.Tensor, fold: int, weight: torch.Tensor | None = None,
            inputs: bool = True) -> None:
        """Tokens ``z`` ``[..., in]`` with targets ``r`` ``[..., out]`` into fold ``fold``;
        ``weight`` ``[...]``: per-token weights of the squared error (default 1). ``inputs=False``
        adds the targets only (the same tokens were added before, after `clear_targets`)."""
        if self.G.device != z.device:  # the statistics live where the model's tokens are (a GPU)
            self.G, self.C, self.rr, self.n = (t.to(z.device) for t in (self.G, self.C, self.rr, self.n))
            self._eig.clear()
        z = z.detach().reshape(-1, self.d_in).double()
        r = r.detach().reshape(-1, self.d_out).to(z.device).double()
        if weight is not None:
            w = weight.detach().reshape(-1, 1).double().sqrt()
            z, r = z * w, r * w
        k = fold % self.folds
        if inputs:
            self.G[k] += z.T @ z
            self.n[k] += z.shape[0]
            self._eig.clear()
        self.C[k] += r.T @ z
        self.rr[k] += r.pow(2).sum()

    def clear_targets(self) -> None:
        """Forget the targets, keep the inputs (and their eigendecompositions): for refits of
        the same tokens toward new targets."""
        self.C.zero_()
        self.rr.zero_()

    def eig(self, folds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition of the inputs' ``G`` summed over ``folds`` (cached)."""
        if folds not in self._eig:
            self._eig[folds] = torch.linalg.eigh(self.G[list(folds)].sum(0))
        return self._eig[folds]

    def total(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.G.sum(0), self.C.sum(0), self.rr.sum()


def ridge_toward(G: torch.Tensor, C: torch.Tensor, W: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(C + lam W)(G + lam I)^-1`` with ``lam = alpha * trace(G) / in``."""
    d = G.shape[0]
    lam = max(alpha, 1e-12) * float(torch.trace(G)) / d  # a floor keeps alpha = 0 solvable
    A = G + lam * torch.eye(d, dtype=G.dtype)
    B = C + lam * W.double()
    return torch.linalg.solve(A, B.T).T  # A is symmetric: (B A^-1)^T = A^-1 B^T


def residual(W: torch.Tensor, G: torch.Tensor, C: torch.Tensor, rr: torch.Tensor) -> float:
    """``sum_t ||W z_t - r_t||^2`` from the statistics."""
    W = W.double()
    return float(torch.einsum("oi,ij,oj->", W, G, W) - 2 * torch.einsum("oi,oi->", W, C) + rr)


def _ridge_path(eig: tuple[torch.Tensor, torch.Tensor], C: torch.Tensor, W: torch.Tensor, alphas) -> list[torch.Tensor]:
    """`ridge_toward` for every ``alpha`` from the eigendecomposition ``eig`` of ``G`` (one
    O(in^3) step, then O(out * in^2) per alpha)."""
    evals, Q = eig
    CQ, WQ = C @ Q, W.double() @ Q
    tr = float(evals.sum()) / len(evals)  # trace(G) / in
    out = []
    for a in alphas:
        lam = max(a, 1e-12) * tr
        out.append(((CQ + lam * WQ) / (evals.clamp_min(0) + lam)) @ Q.T)
    return out


def choose_alpha(stats: RefitStats, W: torch.Tensor, alphas=ALPHAS) -> tuple[float | None, dict]:
    """The ``alpha`` with the lowest held-out residual (each fold predicted by a fit on the
    others), or None when the unchanged ``W`` is better on held-out tokens. Returns also the
    held-out residual of every candidate (``None`` = unchanged) for the report."""
    errors: dict = {None: sum(residual(W, stats.G[k], stats.C[k], stats.rr[k]) for k in range(stats.folds))}
    for a in alphas:
        errors[a] = 0.0
    for k in range(stats.folds):
        rest = [j for j in range(stats.folds) if j != k]
        for a, fit in zip(alphas, _ridge_path(stats.eig(tuple(rest)), stats.C[rest].sum(0), W, alphas)):
            errors[a] += residual(fit, stats.G[k], stats.C[k], stats.rr[k])
    best = min(errors, key=lambda a: (errors[a], a is not None))
    return best, errors


def fold_fits(stats: RefitStats, W: torch.Tensor, alpha: float) -> list[torch.Tensor]:
    """For each fold ``k``, the fit with ``alpha`` on every fold but ``k``: what predicts fold
    ``k`` without having seen it (cross-fitting)."""
    out = []
    for k in range(stats.folds):
        rest = [j for j in range(stats.folds) if j != k]
        out.append(ridge_toward(stats.G[rest].sum(0), stats.C[rest].sum(0), W, alpha))
    return out


def refit(stats: RefitStats, W: torch.Tensor, alphas=ALPHAS, repeat: bool = False) -> tuple[torch.Tensor | None, dict]:
    """The refit weight on all calibration tokens with the cross-validated ``alpha`` (None: keep
    ``W``), and a report: alpha, tokens, held-out and in-sample residuals before and after.
    ``repeat``: the same inputs will be refit toward other targets (`RefitStats.clear_targets`),
    so the decomposition of all tokens is kept for them."""
    alpha, errors = choose_alpha(stats, W, alphas)
    G, C, rr = stats.total()
    info = {"alpha": alpha, "tokens": int(stats.n.sum()), "heldout_before": errors[None],
            "heldout_after": errors[alpha], "fit_before": residual(W, G, C, rr)}
    if alpha is None:
        info["fit_after"] = info["fit_before"]
        return None, info
    full = tuple(range(stats.folds))
    # refits of the same inputs toward new targets reuse one eigendecomposition; a single refit
    # solves (cheaper than decomposing)
    new = _ridge_path(stats.eig(full), C, W, [alpha])[0] if repeat else ridge_toward(G, C, W, alpha)
    info["fit_after"] = residual(new, G, C, rr)
    return new, info
