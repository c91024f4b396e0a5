"""The dual (tokens) form of the ridge refits: with fewer tokens than inputs, the same results as
the primal form (statistics only, ``RefitStats(dual=False)``) up to float64 rounding, without
decomposing the ``[in, in]`` matrix ``G``."""
import pytest
import torch

from depthprune.compensate.lsq import RefitStats, choose_alpha, fold_fits, refit

pytestmark = pytest.mark.unit

RTOL = 1e-9


def _data(d_in=96, d_out=24, chunks=(10, 10, 10, 10), weights=False, bias=False, seed=0):
    """The current weight ``W`` and chunks ``(z, r, fold, weight)`` of tokens whose targets a
    shrunk refit of ``W`` predicts better than ``W`` (a clear cross-validated ``alpha``); the
    chunks alternate between two folds, as the writer's samples do. ``bias``: a ones column last,
    as the writer appends one."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    W_true = W + torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    out = []
    for i, n in enumerate(chunks):
        z = torch.randn(n, d_in - bias, generator=g)
        if bias:
            z = torch.cat([z, torch.ones(n, 1)], 1)
        r = z @ W_true.T + 0.5 * torch.randn(n, d_out, generator=g)
        w = torch.rand(n, generator=g) + 0.5 if weights else None
        out.append((z, r, i % 2, w))
    return W, out


def _stats(d_in, d_out, chunks, dual=True):
    stats = RefitStats(d_in, d_out, dual=dual)
    for z, r, k, w in chunks:
        stats.add(z, r, k, w)
    return stats


def _close(a, b, rtol=RTOL):
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def _assert_same_errors(ed, ep, rtol=RTOL):
    assert ed.keys() == ep.keys()
    for a in ed:
        if a == 0.0:
            # alpha = 0 (lam = 1e-12 trace(G) / in) with rank(G) = n < in: the primal form divides
            # rounding noise of G's null eigenvalues (~1e-16 |G|) by lam, so it is only ~1e-4
            # accurate there; the dual form is exact (`test_dual_alpha_zero_is_exact`)
            assert _close(ed[a], ep[a], 1e-2), (a, ed[a], ep[a])
        else:
            assert _close(ed[a], ep[a], rtol), (a, ed[a], ep[a])


CASES = {"plain": {}, "weights": {"weights": True}, "bias+weights": {"weights": True, "bias": True}}


@pytest.mark.parametrize("case", list(CASES))
def test_dual_equals_primal(case):
    d_in, d_out = 96, 24
    W, chunks = _data(d_in, d_out, **CASES[case])
    dual, primal = _stats(d_in, d_out, chunks), _stats(d_in, d_out, chunks, dual=False)
    assert dual.rows((0, 1)) is not None and primal.rows((0, 1)) is None
    assert dual.rows((0, 1))[0].shape == (40, d_in)

    ad, ed = choose_alpha(dual, W)
    ap, ep = choose_alpha(primal, W)
    assert ad == ap and ad not in (None, 0.0)
    _assert_same_errors(ed, ep)

    for repeat in (False, True):
        nd, infod = refit(dual, W, repeat=repeat)
        np_, infop = refit(primal, W, repeat=repeat)
        assert torch.allclose(nd, np_, rtol=RTOL, atol=RTOL * float(np_.abs().max()))
        assert infod.keys() == infop.keys()
        assert infod["alpha"] == infop["alpha"] and infod["tokens"] == infop["tokens"] == 40
        for key in ("heldout_before", "heldout_after", "fit_before", "fit_after"):
            assert _close(infod[key], infop[key]), (key, infod[key], infop[key])

    for fd, fp in zip(fold_fits(dual, W, ad), fold_fits(primal, W, ad)):
        assert torch.allclose(fd, fp, rtol=RTOL, atol=RTOL * float(fp.abs().max()))


def test_dual_alpha_zero_is_exact():
    """At ``alpha = 0`` the refit moves ``W`` only within the span of the tokens (the ridge
    solution's update ``E^T (K + lam)^-1 Z`` lies in it); the dual form keeps that exactly."""
    d_in, d_out = 96, 24
    W, chunks = _data(d_in, d_out, weights=True)
    dual = _stats(d_in, d_out, chunks)
    Z = dual.rows((0, 1))[0]
    D = fold_fits(dual, W, 0.0)[0] - W.double()  # fit on fold 1
    Z1 = dual.rows((1,))[0]
    Q, _ = torch.linalg.qr(Z1.T)  # an orthonormal basis of fold 1's span
    assert float((D - D @ Q @ Q.T).norm()) <= 1e-9 * float(D.norm())
    assert Z.shape[0] < d_in


def test_enough_tokens_go_primal():
    d_in, d_out = 24, 8
    W, chunks = _data(d_in, d_out, chunks=(10, 10, 10, 10), weights=True, bias=True)
    dual = RefitStats(d_in, d_out)
    for i, (z, r, k, w) in enumerate(chunks):
        dual.add(z, r, k, w)
        assert (dual.rows((0, 1)) is None) == ((i + 1) * 10 >= d_in)  # rows dropped at d_in tokens
    assert dual._Z is None and dual._R is None
    primal = _stats(d_in, d_out, chunks, dual=False)
    ad, ed = choose_alpha(dual, W)
    ap, ep = choose_alpha(primal, W)
    assert ad == ap
    _assert_same_errors(ed, ep, 1e-12)
    nd, infod = refit(dual, W)
    np_, infop = refit(primal, W)
    assert infod == pytest.approx(infop, rel=1e-12)
    assert (nd is None) == (np_ is None)
    if nd is not None:
        assert torch.allclose(nd, np_, rtol=1e-12, atol=0)
    for fd, fp in zip(fold_fits(dual, W, 0.3), fold_fits(primal, W, 0.3)):
        assert torch.allclose(fd, fp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dual", [True, False])
def test_clear_targets_then_new_targets_equal_a_fresh_refit(dual):
    d_in, d_out = 96, 24
    W, chunks = _data(d_in, d_out, weights=True, bias=True)
    _, other = _data(d_in, d_out, weights=True, bias=True, seed=1)
    new_targets = [(z, r2, k, w) for (z, _, k, w), (_, r2, _, _) in zip(chunks, other)]
    stats = _stats(d_in, d_out, chunks, dual)
    refit(stats, W, repeat=True)  # decompositions cached for the inputs
    stats.clear_targets()
    assert stats.rows((0, 1)) is None  # dual: targets missing, nothing to compute from yet
    for z, r, k, w in new_targets:
        stats.add(z, r, k, w, inputs=False)
    assert (stats.rows((0, 1)) is not None) == dual
    fresh = _stats(d_in, d_out, new_targets, dual)
    for repeat in (False, True):
        n1, i1 = refit(stats, W, repeat=repeat)
        n2, i2 = refit(fresh, W, repeat=repeat)
        assert i1 == pytest.approx(i2, rel=1e-9)
        assert torch.allclose(n1, n2, rtol=RTOL, atol=RTOL * float(n2.abs().max()))


def test_dual_never_decomposes_g(monkeypatch):
    d_in, d_out = 96, 24
    W, chunks = _data(d_in, d_out, weights=True, bias=True)
    stats = _stats(d_in, d_out, chunks)
    shapes = []
    eigh = torch.linalg.eigh

    def recording(A, *args, **kwargs):
        shapes.append(tuple(A.shape))
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    solve = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda A, B, *a, **k: shapes.append(tuple(A.shape)) or solve(A, B, *a, **k))
    new, info = refit(stats, W)
    refit(stats, W, repeat=True)
    fold_fits(stats, W, info["alpha"])
    assert new is not None and shapes and all(s[0] <= 40 < d_in for s in shapes), shapes
    stats.eig((0, 1))  # a caller asking for G's decomposition still gets it
    assert shapes[-1] == (d_in, d_in)


def test_a_writer_behind_a_norm_refits_as_in_the_primal_form(monkeypatch):
    """The writer's refit through a norm (`Compensator._rescaled`: `RefitStats.eig`, then refits
    toward re-scaled targets after `clear_targets`) from fewer tokens than inputs (12 < 33)."""
    import functools

    from depthprune.compensate import Compensator, writer
    from test_compensate import PostLNBlock, Toy

    torch.manual_seed(1)
    m = Toy(d=8, block=PostLNBlock)
    comp = Compensator(m, [(torch.randn(2, 6, 8),)], lambda mod, inp: mod(*inp))
    _, _, w, norm = comp.find_writer(1)
    assert norm is not None
    with torch.no_grad():
        w.weight.add_(torch.randn(w.weight.shape) * w.weight.std())
    fits = {}
    for dual in (True, False):
        monkeypatch.setattr(writer, "RefitStats", functools.partial(RefitStats, dual=dual))
        fits[dual] = comp._fit(1)
    assert fits[True].stats.rows((0, 1)) is not None and fits[False].stats.rows((0, 1)) is None
    assert fits[True].info["alpha"] not in (None, 0.0)  # (at 0 the primal form is only ~1e-4 accurate)
    i1, i2 = fits[True].info, fits[False].info
    assert i1.keys() == i2.keys()
    for key in i1:
        assert i1[key] == (pytest.approx(i2[key], rel=RTOL) if isinstance(i2[key], float) else i2[key]), key
    assert torch.allclose(fits[True].new, fits[False].new, rtol=1e-6, atol=0)  # in the module's float32
