"""Closed-form least-squares refits: pure functions on tensors (float64).

A linear layer ``W`` (``[out, in]``) whose output enters the model additively is refit so that its
output ``W' z`` matches a target ``r`` over calibration tokens, shrunk toward the current weight:

    W' = argmin  sum_t ||W' z_t - r_t||^2 + lam ||W' - W||_F^2  =  (C + lam W)(G + lam I)^-1,

with the sufficient statistics ``G = sum z z^T`` and ``C = sum r z^T``, and
``lam = alpha * trace(G) / in``. ``alpha`` is chosen by two-fold cross-validation on the
calibration tokens themselves (fit on one fold, measure on the other); when no ``alpha`` beats the
unchanged weight on held-out tokens, nothing is refit. This is what keeps a small calibration set
from overfitting a large layer.

While fewer tokens than inputs have been added (``n < in``: ``G`` has rank ``n``), the tokens
themselves are kept (``Z``: ``[n, in]``, targets ``R``: ``[n, out]``) and everything is computed
from them instead, in the *dual form*: ``W' = W + (R - Z W^T)^T (Z Z^T + lam I)^-1 Z`` (Woodbury),
every ``alpha`` from one eigendecomposition of the ``[n, n]`` kernel ``Z Z^T``, and residuals as
``||Z W'^T - R||^2``: O(n^2 in + n in out) instead of O(in^3 + in^2 out). The results are those of
the primal form up to rounding; from ``in`` tokens on the tokens are dropped and the primal form
is used.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALPHAS = (0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class RefitStats:
    """Sufficient statistics of ``min ||W' z - r||^2``, kept per fold; and, while fewer tokens
    than inputs have been added (and ``dual``), the (weighted) tokens themselves."""

    d_in: int
    d_out: int
    folds: int = 2
    dual: bool = True  # False: statistics only, always the primal form
    G: torch.Tensor = field(init=False)
    C: torch.Tensor = field(init=False)
    rr: torch.Tensor = field(init=False)
    n: torch.Tensor = field(init=False)
    _eig: dict = field(init=False, repr=False)
    _keig: dict = field(init=False, repr=False)
    _Z: list | None = field(init=False, repr=False)  # per fold: chunks of input rows (None: dropped)
    _R: list | None = field(init=False, repr=False)  # per fold: chunks of target rows

    def __post_init__(self) -> None:
        f = self.folds
        self.G = torch.zeros(f, self.d_in, self.d_in, dtype=torch.float64)
        self.C = torch.zeros(f, self.d_out, self.d_in, dtype=torch.float64)
        self.rr = torch.zeros(f, dtype=torch.float64)
        self.n = torch.zeros(f, dtype=torch.long)
        self._eig, self._keig = {}, {}
        self._Z, self._R = ([[] for _ in range(f)], [[] for _ in range(f)]) if self.dual else (None, None)

    def add(self, z: torch.Tensor, r: torch.Tensor, fold: int, weight: torch.Tensor | None = None,
            inputs: bool = True) -> None:
        """Tokens ``z`` ``[..., in]`` with targets ``r`` ``[..., out]`` into fold ``fold``;
        ``weight`` ``[...]``: per-token weights of the squared error (default 1). ``inputs=False``
        adds the targets only (the same tokens were added before, in the same order, after
        `clear_targets`)."""
        if self.G.device != z.device:  # the statistics live where the model's tokens are (a GPU)
            self.G, self.C, self.rr, self.n = (t.to(z.device) for t in (self.G, self.C, self.rr, self.n))
            if self._Z is not None:
                self._Z, self._R = ([[t.to(z.device) for t in f] for f in rows] for rows in (self._Z, self._R))
            self._eig.clear()
            self._keig.clear()
        z = z.detach().reshape(-1, self.d_in).to(torch.float64, copy=True)  # copies: rows may be kept
        r = r.detach().reshape(-1, self.d_out).to(z.device, torch.float64, copy=True)
        if weight is not None:
            w = weight.detach().reshape(-1, 1).double().sqrt()
            z, r = z * w, r * w
        k = fold % self.folds
        if inputs:
            self.G[k] += z.T @ z
            self.n[k] += z.shape[0]
            self._eig.clear()
            self._keig.clear()
        self.C[k] += r.T @ z
        self.rr[k] += r.pow(2).sum()
        if self._Z is not None:
            if inputs:
                self._Z[k].append(z)
            self._R[k].append(r)
            if sum(len(t) for f in self._Z for t in f) >= self.d_in:  # G is no larger: primal from now on
                self._Z = self._R = None

    def clear_targets(self) -> None:
        """Forget the targets, keep the inputs (and their eigendecompositions): for refits of
        the same tokens toward new targets."""
        self.C.zero_()
        self.rr.zero_()
        if self._R is not None:
            self._R = [[] for _ in range(self.folds)]

    def eig(self, folds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition of the inputs' ``G`` summed over ``folds`` (cached)."""
        if folds not in self._eig:
            self._eig[folds] = torch.linalg.eigh(self.G[list(folds)].sum(0))
        return self._eig[folds]

    def rows(self, folds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept tokens of ``folds``: inputs ``[n, in]`` and targets ``[n, out]`` (weighted), or
        None in the primal form (as many tokens as inputs, ``dual=False``, or targets missing)."""
        if self._Z is None or any(sum(map(len, self._Z[k])) != sum(map(len, self._R[k])) for k in range(self.folds)):
            return None
        out = []
        for rows, width in ((self._Z, self.d_in), (self._R, self.d_out)):
            for k in folds:  # each fold's chunks joined once
                if len(rows[k]) != 1:
                    rows[k] = [torch.cat(rows[k]) if rows[k] else self.G.new_zeros(0, width)]
            parts = [rows[k][0] for k in folds]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts) if parts else self.G.new_zeros(0, width))
        return out[0], out[1]

    def kernel_eig(self, folds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition of the kernel ``Z Z^T`` (``[n, n]``) of the tokens of ``folds``
        (the dual form; cached)."""
        if folds not in self._keig:
            Z = self.rows(folds)[0]
            self._keig[folds] = torch.linalg.eigh(Z @ Z.T)
        return self._keig[folds]

    def total(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.G.sum(0), self.C.sum(0), self.rr.sum()


def ridge_toward(G: torch.Tensor, C: torch.Tensor, W: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(C + lam W)(G + lam I)^-1`` with ``lam = alpha * trace(G) / in``."""
    d = G.shape[0]
    lam = max(alpha, 1e-12) * float(torch.trace(G)) / d  # a floor keeps alpha = 0 solvable
    A = G + lam * torch.eye(d, dtype=G.dtype, device=G.device)
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


def _dual(stats: RefitStats, folds: tuple[int, ...], W: torch.Tensor):
    """The fits on the tokens of ``folds`` in the dual form, ``W' = W + (EU / (s + lam)) @ UZ``:
    returns ``W`` (float64), ``EU = E^T U`` with ``E = R - Z W^T``, ``UZ = U^T Z``, ``s`` (from the
    eigendecomposition ``U diag(s) U^T`` of the kernel ``K = Z Z^T``) and ``trace(G) / in``
    (``lam = alpha * trace(G) / in``). This is Woodbury's ``(G + lam)^-1 = (I - Z^T (K + lam)^-1 Z) / lam``
    applied to ``C + lam W`` with ``C = R^T Z`` cancelled exactly: no division by a small ``lam``."""
    Z, R = stats.rows(folds)
    s, U = stats.kernel_eig(folds)
    W = W.double()
    return W, (R - Z @ W.T).T @ U, U.T @ Z, s.clamp_min(0), float(s.sum()) / stats.d_in  # trace(K) = trace(G)


def _path(stats: RefitStats, folds: tuple[int, ...], W: torch.Tensor, alphas) -> list[torch.Tensor]:
    """`ridge_toward` on the tokens of ``folds`` for every ``alpha`` (one decomposition): in the
    dual form (`_dual`) while ``stats`` keeps the tokens, else from ``G``'s (`_ridge_path`)."""
    if stats.rows(folds) is None:
        return _ridge_path(stats.eig(folds), stats.C[list(folds)].sum(0), W, alphas)
    W, EU, UZ, s, tr = _dual(stats, folds, W)
    return [W + (EU / (s + max(a, 1e-12) * tr)) @ UZ for a in alphas]


def _fit(stats: RefitStats, folds: tuple[int, ...], W: torch.Tensor, alpha: float, repeat: bool = False) -> torch.Tensor:
    """`ridge_toward` on the tokens of ``folds``: a solve in the primal form (cheaper than
    decomposing) unless ``repeat`` (the decomposition is kept for refits toward other targets)."""
    if repeat or stats.rows(folds) is not None:
        return _path(stats, folds, W, [alpha])[0]
    f = list(folds)
    return ridge_toward(stats.G[f].sum(0), stats.C[f].sum(0), W, alpha)


def _error(stats: RefitStats, W: torch.Tensor, folds: tuple[int, ...]) -> float:
    """`residual` of ``W`` on the tokens of ``folds``: directly from them in the dual form."""
    rows = stats.rows(folds)
    if rows is None:
        f = list(folds)
        return residual(W, stats.G[f].sum(0), stats.C[f].sum(0), stats.rr[f].sum())
    Z, R = rows
    return float((Z @ W.double().T - R).pow(2).sum())


def choose_alpha(stats: RefitStats, W: torch.Tensor, alphas=ALPHAS) -> tuple[float | None, dict]:
    """The ``alpha`` with the lowest held-out residual (each fold predicted by a fit on the
    others), or None when the unchanged ``W`` is better on held-out tokens. Returns also the
    held-out residual of every candidate (``None`` = unchanged) for the report."""
    errors: dict = {None: sum(_error(stats, W, (k,)) for k in range(stats.folds))}
    for a in alphas:
        errors[a] = 0.0
    for k in range(stats.folds):
        rest = tuple(j for j in range(stats.folds) if j != k)
        if stats.rows(rest) is None:
            for a, fit in zip(alphas, _path(stats, rest, W, alphas)):
                errors[a] += _error(stats, fit, (k,))
            continue
        # dual: fold k's errors Z_k W'^T - R_k = (Z_k W^T - R_k) + (Z_k UZ^T / (s + lam)) EU^T,
        # without forming the fits W'
        W64, EU, UZ, s, tr = _dual(stats, rest, W)
        Zk, Rk = stats.rows((k,))
        E0, P = Zk @ W64.T - Rk, Zk @ UZ.T
        for a in alphas:
            errors[a] += float((E0 + (P / (s + max(a, 1e-12) * tr)) @ EU.T).pow(2).sum())
    best = min(errors, key=lambda a: (errors[a], a is not None))
    return best, errors


def fold_fits(stats: RefitStats, W: torch.Tensor, alpha: float) -> list[torch.Tensor]:
    """For each fold ``k``, the fit with ``alpha`` on every fold but ``k``: what predicts fold
    ``k`` without having seen it (cross-fitting)."""
    return [_fit(stats, tuple(j for j in range(stats.folds) if j != k), W, alpha) for k in range(stats.folds)]


def refit(stats: RefitStats, W: torch.Tensor, alphas=ALPHAS, repeat: bool = False) -> tuple[torch.Tensor | None, dict]:
    """The refit weight on all calibration tokens with the cross-validated ``alpha`` (None: keep
    ``W``), and a report: alpha, tokens, held-out and in-sample residuals before and after.
    ``repeat``: the same inputs will be refit toward other targets (`RefitStats.clear_targets`),
    so the decomposition of all tokens is kept for them."""
    alpha, errors = choose_alpha(stats, W, alphas)
    full = tuple(range(stats.folds))
    info = {"alpha": alpha, "tokens": int(stats.n.sum()), "heldout_before": errors[None],
            "heldout_after": errors[alpha], "fit_before": _error(stats, W, full)}
    if alpha is None:
        info["fit_after"] = info["fit_before"]
        return None, info
    new = _fit(stats, full, W, alpha, repeat)
    info["fit_after"] = _error(stats, new, full)
    return new, info
