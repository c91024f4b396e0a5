"""Training-free compensation: after a prune, refit the layer that writes the changed block's
output so the block's output matches the dense model's on calibration tokens.

Generic, read from the model's behaviour rather than its names:

- the *target* is the dense output of the last block the prune changed (cached once, before any
  pruning, by `depthprune.blocks`), or of the last of the pruned-away blocks right after it: the
  prune of a block just before a removed run is refit for the end of the run, so the refit that
  absorbed the run is not undone;
- the *writer* is the last affine layer executed in that block
  (`depthprune.layers.affine_widths`: a ``Linear`` or a registered 2-D weight layout, e.g.
  GPT-2's transposed ``Conv1D`` ``c_proj``) whose output
  enters the block's output additively with unit weight (a residual writer: Llama's
  ``down_proj``, or ``o_proj`` once the MLP is gone). This is checked numerically: adding
  ``delta`` to the candidate's output must add exactly ``delta`` to the block's output, and the
  candidate's output must be its weight's map of its input (tokens may come flattened, as in
  OPT's MLP; outputs are copied, since a block may add to them in place). When the block has been
  pruned away completely (its output equals its input), the search continues in the block
  before it: that is ReplaceMe's choice (the MLP before a removed run of blocks absorbs the run);
  a writer may also reach the block output through a per-token norm (post-sublayer norms, as in
  Gemma 2 and OLMo 2; or after the add, as in BERT): its form is checked on the tokens (`PostNorm`) and the writer is refit
  for the norm's output, matching each token's direction at free scales (`Compensator._rescaled`);
- the refit is the cross-validated ridge of `depthprune.compensate.lsq`, on the *pruned*
  model's inputs, so it also absorbs the drift of earlier prunes. It changes weights only: no
  parameter is added, shapes stay, plans and saved directories work as for any pruned model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn as nn

from ..blocks import BlockInputs, BlockStates, block_of, find_blocks
from .. import layers as K
from .lsq import ALPHAS, RefitStats, fold_fits, refit


class Fit(NamedTuple):
    """A refit of a residual writer: ``module`` (at ``path``, in block ``block``), the ``new``
    weight (``[out, in (+1 for the bias)]``; None when the cross-validation keeps the old one),
    the report, and the statistics it was fit from."""

    block: int
    path: str
    module: nn.Module
    new: torch.Tensor | None
    info: dict
    stats: RefitStats
    old: torch.Tensor


def _delta(out: torch.Tensor) -> torch.Tensor:
    """A fixed random change of ``out`` at its scale: what the numeric checks add to an output."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype) * out.std().clamp_min(1e-3)


class PostNorm(NamedTuple):
    """A per-token norm between a writer and the residual add (Gemma 2/3's and OLMo 2's
    post-sublayer norms), in the form checked on calibration tokens:
    ``y = gain * u(x) + shift``, ``u(x) = x' / sqrt(mean(x'^2) + eps)`` with ``x' = x`` (RMS)
    or ``x - mean(x)`` (``centred``, LayerNorm). Its output ignores the scale of its input."""

    path: str
    module: nn.Module
    centred: bool
    eps: float
    gain: torch.Tensor
    shift: torch.Tensor

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def target(self, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the norm's input should be for its output to be ``y``, its input now being
        ``x``: ``scale * direction + mean`` per token, ``direction`` of unit RMS (centred if the
        norm centres; channels the norm zeroes keep ``x``'s), ``scale`` and ``mean`` ``x``'s.
        The norm ignores its input's scale (up to ``eps``, negligible when the input's mean
        square is far above it), so the scale is free: `Compensator._rescaled` refines it."""
        live = self.gain.abs() > 1e-6 * self.gain.abs().max()
        u = torch.where(live, (y.double() - self.shift) / torch.where(live, self.gain, 1.0), self.unit(x))
        if self.centred:
            u = u - u.mean(-1, keepdim=True)
        x = x.double()
        mean = x.mean(-1, keepdim=True) if self.centred else torch.zeros_like(x[..., :1])
        scale = (x - mean).pow(2).mean(-1, keepdim=True).sqrt()
        return scale, u / u.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30), mean

    @staticmethod
    def fitted(path: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> "PostNorm | None":
        """The form that maps every token of ``x`` to ``y`` (``[tokens, d]``), or None."""
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 0.0))
        eps = float(eps) if isinstance(eps, (int, float)) else 0.0
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        for centred in (False, True):
            u = PostNorm(path, module, centred, eps, None, None).unit(x)
            du, dy = u - u.mean(0), y - y.mean(0)
            gain = (du * dy).sum(0) / du.pow(2).sum(0).clamp_min(1e-30)  # per channel, y = gain u + shift
            shift = y.mean(0) - gain * u.mean(0)
            if torch.allclose(gain * u + shift, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()) + 1e-6):
                return PostNorm(path, module, centred, eps, gain, shift)
        return None


class Writer(NamedTuple):
    """A residual writer of block ``block``: the affine layer ``module`` at ``path`` whose output
    enters the block output additively, directly or through the per-token ``norm``."""

    block: int
    path: str
    module: nn.Module
    norm: PostNorm | None = None


#: a writer behind a norm: most refits toward re-scaled targets, how weakly its scales are held to
#: the current ones where the fit leaves them free, and the most tokens whose scales are solved
#: together (a [tokens, tokens] float64 matrix: 32 MB)
NORM_PASSES, NORM_PULL, NORM_TOKENS = 3, 1e-6, 2048


class Compensator:
    """Refits residual writers after prunes. ``batches``/``forward_fn`` as for the scorers.

    ``cross_fit`` (`what_if`, i.e. compensated scoring; off by default): each calibration sample
    is predicted by the refit made without its fold, so a trial's score does not count the
    refit's own fit to the tokens it is measured on (the committed refit always uses every
    token). Off, a trial's score is exactly what committing the group and its refit gives."""

    def __init__(self, model: nn.Module, batches: list, forward_fn: Callable, alphas=ALPHAS,
                 token_weight: str = "rms", logits_fn: Callable | None = None, nll_fn: Callable | None = None):
        self.model = model
        self.blocks = find_blocks(model)
        self.states = BlockStates(BlockInputs(model, batches, forward_fn, self.blocks))
        self.dense = [list(o) for o in self.states.outputs]  # targets: dense block outputs
        self.alphas = alphas
        self.token_weight = token_weight
        self.batches, self.logits_fn, self.nll_fn = batches, logits_fn, nll_fn
        self.cross_fit = False
        self.log: list[dict] = []

    # ------------------------------------------------------------------ running blocks
    def _run(self, start: int, end: int, i: int) -> torch.Tensor:
        h = self.states.inputs[start][i]
        for b in range(start, end + 1):
            h = self.states.cache.call(b, h, i)
        return h

    def _transforms(self, b: int) -> list[tuple[str, nn.Module]]:
        """Transforms of block ``b`` in the order they run (on calibration batch 0)."""
        path, block = self.blocks[b]
        order: list[tuple[str, nn.Module]] = []
        names = {m: f"{path}.{n}" for n, m in block.named_modules() if K.is_transform_module(m)}
        handles = [m.register_forward_hook(lambda m, a, o: order.append((names[m], m))) for m in names]
        try:
            with torch.no_grad():
                self.states.cache.call(b, self.states.inputs[b][0], 0)
        finally:
            for h in handles:
                h.remove()
        seen, out = set(), []
        for name, m in order:
            if id(m) not in seen:
                seen.add(id(m))
                out.append((name, m))
        return out

    @torch.no_grad()
    def _additive(self, m: nn.Module, start: int, end: int) -> bool:
        """Adding delta to ``m``'s output adds exactly delta to block ``end``'s output."""
        ref = self._run(start, end, 0)
        delta = {}

        def bump(mod, args, out):  # the output may come flattened over tokens (``[batch * seq, d]``)
            if not isinstance(out, torch.Tensor) or out.numel() != ref.numel() or out.shape[-1] != ref.shape[-1]:
                return None
            d = _delta(out)
            delta["d"] = d.reshape(ref.shape)
            return out + d

        h = m.register_forward_hook(bump)
        try:
            bumped = self._run(start, end, 0)
        finally:
            h.remove()
        if "d" not in delta:
            return False
        err = (bumped - ref - delta["d"]).abs().max()
        return bool(err <= 1e-3 * delta["d"].abs().max())

    @torch.no_grad()
    def _is_affine(self, m: nn.Module, b: int) -> bool:
        """``m``'s output on calibration batch 0 is the affine map of its input that its weight
        and bias describe (what the refit assumes)."""
        got: dict = {}

        def keep(mod, args, out) -> None:
            if "zo" not in got and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                # copies: the block may add to them in place
                got["zo"] = (args[0].clone(), out.clone())

        h = m.register_forward_hook(keep)
        try:
            self.states.cache.call(b, self.states.inputs[b][0], 0)
        finally:
            h.remove()
        if "zo" not in got:
            return False
        z, o = got["zo"]
        W = K.affine_weight(m)
        if z.shape[-1] != W.shape[1]:
            return False
        want = nn.functional.linear(z, W, m.bias)
        return want.shape == o.shape and bool(torch.allclose(want, o, rtol=1e-4, atol=1e-5 * float(o.abs().max()) + 1e-6))

    @torch.no_grad()
    def _post_norm(self, m: nn.Module, b: int, t: int) -> PostNorm | None:
        """The per-token norm whose input moves exactly as ``m``'s output does (it takes that
        output, or a sum holding it: a norm after the residual add, as in BERT) and whose output
        enters block ``t``'s output additively, or None (checked on calibration batch 0)."""
        path, block = self.blocks[b]
        mods = {n: x for n, x in block.named_modules() if x is not m and not K.is_transform_module(x)}
        runs = []
        for bump in (False, True):
            seen: dict = {}

            def write(mod, args, out, bump=bump, seen=seen):
                if isinstance(out, torch.Tensor) and bump:
                    seen["d"] = _delta(out)
                    return out + seen["d"]
                return None

            def keep(mod, args, out, seen=seen) -> None:
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    seen.setdefault(id(mod), (args[0].clone(), out.clone()))
            hooks = [m.register_forward_hook(write)] + [x.register_forward_hook(keep) for x in mods.values()]
            try:
                self.states.cache.call(b, self.states.inputs[b][0], 0)
            finally:
                for h in hooks:
                    h.remove()
            runs.append(seen)
        plain, bumped = runs
        d = bumped.get("d")
        if d is None:
            return None
        for name, x in mods.items():
            xy, moved = plain.get(id(x)), bumped.get(id(x))
            if (xy is None or moved is None or xy[0].shape != d.shape or xy[1].shape != d.shape
                    or (moved[0] - xy[0] - d).abs().max() > 1e-3 * d.abs().max()):
                continue
            norm = PostNorm.fitted(f"{path}.{name}", x, *xy)
            if norm is not None and self._additive(x, b, t):
                return norm
        return None

    def find_writer(self, t: int) -> Writer | None:
        """The residual writer for block ``t``'s output, or None."""
        for b in range(t, -1, -1):
            for path, m in reversed(self._transforms(b)):
                if K.affine_widths(m) is None or not self._is_affine(m, b):
                    continue
                if self._additive(m, b, t):
                    return Writer(b, path, m)
                norm = self._post_norm(m, b, t)
                if norm is not None:
                    return Writer(b, path, m, norm)
            if not self.states.passes(b):  # live computation in block b that no single writer can absorb linearly
                return None
        return None

    # ------------------------------------------------------------------ the step
    def _blocks_changed(self, changed_paths: Iterable[str]) -> tuple[int, int] | None:
        """(first, last) block ``changed_paths`` touch, the last extended over the blocks right
        after it that pass their input on unchanged: a refit must match the dense output at the
        end of such a run (removing the block before a removed run keeps the run absorbed).
        The states of the blocks after the change must be those of the last refresh."""
        changed = [b for b in (block_of(p, self.blocks) for p in changed_paths) if b is not None]
        if not changed:
            return None
        t = max(changed)
        while t + 1 < len(self.blocks) and self.states.passes(t + 1):
            t += 1
        return min(changed), t

    @torch.no_grad()
    def _fit(self, t: int) -> Fit | None:
        """The refit of block ``t``'s residual writer from the current states (valid up to block
        ``t``), or None without a writer."""
        found = self.find_writer(t)
        if found is None:
            return None
        w, path, m, norm = found
        bias = m.bias is not None
        n_in, n_out = K.affine_widths(m)
        stats = RefitStats(n_in + bias, n_out)
        kept = []  # behind a norm: per batch (inputs, directions, scales, offsets, token weights)
        seen = 0
        for i in range(len(self.states.inputs[w])):
            got = {}
            # copies: a block may add to the writer's output in place (Falcon's parallel attention)
            hooks = [m.register_forward_hook(lambda mod, a, o: got.update(z=a[0].clone(), o=o.clone()))]
            if norm is not None:
                hooks.append(norm.module.register_forward_hook(lambda mod, a, o: got.update(a=a[0].clone(), y=o.clone())))
            try:
                P = self._run(w, t, i)
            finally:
                for h in hooks:
                    h.remove()
            L = self.dense[t][i].to(P.dtype)
            z, o = got["z"].reshape(*L.shape[:-1], n_in), got["o"].reshape(L.shape)  # tokens may come flattened
            if bias:
                z = torch.cat([z, torch.ones_like(z[..., :1])], -1)
            # Each token's error counts relative to its own scale: what the next norm reads is
            # h / rms(h), and a few tokens (the first of a window) carry huge activations that
            # would otherwise decide the whole fit.
            tw = 1.0 / L.double().pow(2).mean(-1).clamp_min(1e-12) if self.token_weight == "rms" else None
            if norm is None:
                r = L - P + o
            else:  # what the norm should output, brought before it at its input's current scale
                a = got["a"].reshape(L.shape)
                scale, u, mean = norm.target(L - P + got["y"].reshape(L.shape), a)
                rest = a.double() - o  # what the norm's input holds besides the writer's output
                kept.append((z, u, scale, mean - rest, tw))
                r = scale * u + mean - rest
            for s in range(z.shape[0]):  # samples alternate between the two folds
                stats.add(z[s], r[s], seen, None if tw is None else tw[s])
                seen += 1
        W = K.affine_weight(m)
        W = torch.cat([W, m.bias[:, None]], 1) if bias else W
        new, info = refit(stats, W.detach(), self.alphas, repeat=norm is not None)
        if norm is not None:
            new, info = self._rescaled(stats, W.detach(), new, info, kept)
            info["through"] = norm.path
        return Fit(w, path, m, None if new is None else new.to(m.weight.dtype), info, stats, W.detach())

    def _rescaled(self, stats: RefitStats, W: torch.Tensor, new: torch.Tensor | None, info: dict,
                  kept: list) -> tuple[torch.Tensor | None, dict]:
        """Refits of a writer behind a norm toward re-scaled targets. The norm ignores each
        token's scale (and the mean, if it centres), so only each token's direction must match:
        the scales that let the ridge refit match the directions best are found (`_scales`, for
        the ``alpha`` the last refit chose), the writer is refit toward them, and again while the
        cross-validated ``alpha`` changes."""
        flat = [torch.cat([k[j].reshape(-1, k[j].shape[-1]) for k in kept]) for j in range(4)]
        z, u, s, c = flat[0].double(), *flat[1:]
        s = s.squeeze(-1)
        tw = torch.ones_like(s) if kept[0][4] is None else torch.cat([k[4].reshape(-1) for k in kept])
        evals, Q = stats.eig(tuple(range(stats.folds)))
        zq = z @ Q
        tried: list = []
        while len(tried) < NORM_PASSES:
            alpha = max(self.alphas) if info["alpha"] is None else info["alpha"]
            if alpha in tried:
                break
            tried.append(alpha)
            s = self._scales(zq, evals, W.double() @ Q, u, c, tw, s, max(alpha, 1e-12) * float(evals.sum()) / len(evals))
            stats.clear_targets()
            seen, at = 0, 0
            for z_, u_, _, c_, tw_ in kept:
                n = u_.shape[0] * u_.shape[1]
                r = s[at:at + n].reshape(*u_.shape[:-1], 1) * u_ + c_
                at += n
                for j in range(z_.shape[0]):
                    stats.add(z_[j], r[j], seen, None if tw_ is None else tw_[j], inputs=False)
                    seen += 1
            new, info = refit(stats, W, self.alphas, repeat=True)
        info["passes"] = len(tried)
        return new, info

    @staticmethod
    def _scales(zq: torch.Tensor, evals: torch.Tensor, WQ: torch.Tensor, u: torch.Tensor, c: torch.Tensor,
                tw: torch.Tensor, s: torch.Tensor, lam: float) -> torch.Tensor:
        """Per-token scales for the targets ``s * u + c`` of the writer's refit (``c``: the norm
        input's mean less what it holds besides the writer's output): the scales that, refit
        toward with ridge ``lam``, leave the least weighted error in each token's direction. The
        error is a convex quadratic in the weight and the scales together; with the weight
        eliminated it is ``(s D (I - A) s - 2 s D b) / 2``, ``A[t, k] = tw[k] (u[t] . u[k]) z[t]
        (G + lam)^-1 z[k] / |u[t]|^2`` and ``D = tw |u|^2`` (``b``: the pull toward the old weight
        and the offsets). Scales along which the error is flat (the norm ignores a common scale
        of the writer's output) stay nearest the current ones ``s`` (a pull of ``NORM_PULL``).
        Solved exactly for up to ``NORM_TOKENS`` tokens, else by one block Gauss-Seidel sweep over
        chunks of that many (memory: one chunk's ``[tokens, tokens]`` matrix). Inputs come in
        ``G``'s eigenbasis (``zq``, eigenvalues ``evals``, old weight ``WQ``)."""
        zd = zq / (evals.clamp_min(0) + lam)
        D = tw * u.pow(2).sum(-1)
        b = (((zd @ (lam * WQ.T + zq.T @ (tw[:, None] * c))) - c) * u).sum(-1) * tw  # D b
        s0, s = s, s.clone()
        V = zq.T @ ((tw * s)[:, None] * u)  # D A s = tw * ((zd @ V) * u).sum(-1)
        for lo in range(0, len(s), NORM_TOKENS):
            k = slice(lo, lo + NORM_TOKENS)
            DA = (zd[k] @ zq[k].T).mul_(u[k] @ u[k].T).mul_(tw[k, None] * tw[None, k])  # D A within the chunk
            outside = tw[k] * ((zd[k] @ V) * u[k]).sum(-1) - DA @ s[k]  # D A s from the other chunks
            DA.neg_().diagonal().add_(D[k] * (1 + NORM_PULL))
            rhs = (b[k] + NORM_PULL * D[k] * s0[k] + outside)[:, None]
            chol, failed = torch.linalg.cholesky_ex(DA)  # positive definite but for rounding
            new = (torch.linalg.lstsq(DA, rhs).solution if failed else torch.cholesky_solve(rhs, chol)).squeeze(-1)
            V += zq[k].T @ ((tw[k] * (new - s[k]))[:, None] * u[k])
            s[k] = new
        return s.clamp_min(1e-6 * float(s0.mean()))

    @staticmethod
    def _swap(m: nn.Module, new: torch.Tensor) -> tuple:
        """Write ``new`` (``[out, in (+1 for the bias)]``) into ``m``; returns what it replaced."""
        old = (m.weight.data, m.bias.data if m.bias is not None else None)
        W = new[:, :K.affine_widths(m)[0]]
        m.weight.data = (W.T if K.affine_transposed(m) else W).contiguous()
        if m.bias is not None:
            m.bias.data = new[:, -1].contiguous()
        return old

    @staticmethod
    def _unswap(m: nn.Module, old: tuple) -> None:
        m.weight.data = old[0]
        if m.bias is not None:
            m.bias.data = old[1]

    @torch.no_grad()
    def compensate(self, changed_paths: Iterable[str]) -> dict | None:
        """Refit the writer of the last block ``changed_paths`` touch; returns the report of the
        refit (None when there is nothing to refit). The model's block states are refreshed."""
        span = self._blocks_changed(changed_paths)
        if span is None:
            return None
        first, t = span
        self.states.refresh(first)
        fit = self._fit(t)
        if fit is None:
            rec = {"block": t, "writer": None, "reason": "no residual writer enters the block output linearly"}
            self.log.append(rec)
            return rec
        w, path, m, new, info = fit.block, fit.path, fit.module, fit.new, fit.info
        if new is not None:
            before = self.calibration_loss(w)
            old = self._swap(m, new)
            after = self.calibration_loss(w)
            info.update(calib_loss_before=before, calib_loss_after=after)
            if before is not None and after > before:  # the guard: never worse on the calibration set
                self._unswap(m, old)
                info.update(alpha=None, reverted="the calibration loss would rise")
            else:
                self.states.refresh(w)
        rec = {"block": t, "writer": path, "writer_block": w, **info}
        self.log.append(rec)
        return rec

    @contextmanager
    def what_if(self, changed_paths: Iterable[str]):
        """Inside a pruning trial: the refit `compensate` would make, applied for the duration of
        the ``with`` block and then undone (weights and states as before, no log entry). Yields
        the first block whose output the trial and the refit changed (None: nothing changed);
        the refit is applied without `compensate`'s calibration-loss guard."""
        span = self._blocks_changed(changed_paths)
        if span is None:
            yield None
            return
        first, t = span
        with self.states.what_if(first, t):
            fit = self._fit(t)
            if fit is None or fit.new is None:
                yield first
                return
            if self.cross_fit:
                fits = [f.to(fit.module.weight.dtype) for f in fold_fits(fit.stats, fit.old, fit.info["alpha"])]
                handle = fit.module.register_forward_hook(self._cross_fitted(fit.block, fits))
                try:
                    yield min(first, fit.block)
                finally:
                    handle.remove()
                return
            old = self._swap(fit.module, fit.new)
            try:
                yield min(first, fit.block)
            finally:
                self._unswap(fit.module, old)

    def _cross_fitted(self, w: int, fits: list[torch.Tensor]):
        """A forward hook for the writer (in block ``w``): the ``k``-th call answers calibration
        batch ``k mod batches``, each sample with the fit of ``fits`` made without the sample's
        fold (the folds of `_fit`: samples alternate, counted across batches)."""
        sizes = [h.shape[0] for h in self.states.inputs[w]]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        calls = [0]

        def hook(mod, args, out):
            i = calls[0] % len(sizes)
            calls[0] += 1
            z = args[0]
            if z.numel() % (sizes[i] * z.shape[-1]):
                raise RuntimeError(f"cross-fitted refit: batch {i} does not hold the {sizes[i]} samples of calibration")
            z = z.reshape(sizes[i], -1, z.shape[-1])  # tokens may come flattened (batch-major)
            folds = (starts[i] + torch.arange(sizes[i])) % len(fits)
            n_in = z.shape[-1]
            outs = torch.stack([nn.functional.linear(z, f[:, :n_in], f[:, n_in] if mod.bias is not None else None)
                                for f in fits])
            return outs[folds, torch.arange(sizes[i])].reshape(out.shape)
        return hook

    @torch.no_grad()
    def calibration_loss(self, start: int) -> float | None:
        """Mean next-token NLL of the current model on the calibration batches (None without
        ``logits_fn``/``nll_fn``); blocks before ``start`` answer from the cached states."""
        if self.logits_fn is None or self.nll_fn is None:
            return None
        nll, count = 0.0, 0
        for i, b in enumerate(self.batches):
            with self.states.skip_to(start, i):
                n, c = self.nll_fn(self.logits_fn(self.model, b), b)
            nll, count = nll + float(n), count + int(c)
        return nll / count
