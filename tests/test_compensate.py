"""Training-free compensation: exact where the removal is exactly linear, never worse on the
calibration set, invisible when nothing is pruned."""
import copy

import pytest
import torch
import torch.nn as nn

from depthprune.compensate import Compensator, RefitStats, refit, residual
from depthprune.depth import DepthPruner

pytestmark = pytest.mark.unit


def test_refit_recovers_an_exact_linear_target_and_keeps_a_useless_one():
    g = torch.Generator().manual_seed(0)
    W_true, W0 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    stats = RefitStats(7, 5)
    for k in range(6):
        z = torch.randn(40, 7, generator=g)
        stats.add(z, z @ W_true.T, k)
    new, info = refit(stats, W0)
    assert info["alpha"] == 0.0 and torch.allclose(new, W_true.double(), atol=1e-6)
    assert residual(new, *stats.total()) < 1e-8 < info["fit_before"]
    # targets that no linear map of z predicts: held-out error says keep the weight
    noise = RefitStats(7, 5)
    for k in range(4):
        noise.add(torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g) * 100, k)
    kept, info = refit(noise, W0)
    assert kept is None and info["alpha"] is None


class ToyBlock(nn.Module):
    """The block's second sublayer ``v`` is linear in the first one's output, which is its whole
    stream (no skip before it): removing ``v`` is exactly compensable in ``w``."""

    def __init__(self, d):
        super().__init__()
        self.u, self.w, self.v = nn.Linear(d, 2 * d), nn.Linear(2 * d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        h = self.w(torch.relu(self.u(x)))
        return h + self.v(h)


class Toy(nn.Module):
    def __init__(self, d=4, n=3):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(d) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _toy():
    torch.manual_seed(0)
    m = Toy()
    batches = [(torch.randn(4, 16, 4),) for _ in range(2)]
    return m, batches


def test_compensating_an_exactly_linear_removal_recovers_the_dense_output():
    m, batches = _toy()
    dense = copy.deepcopy(m)
    comp = Compensator(m, batches, lambda mod, inp: mod(*inp))
    dp = DepthPruner(m, (torch.randn(1, 5, 4),))
    dp.prune("blocks.1.v")
    x = torch.randn(3, 7, 4)
    assert (m(x) - dense(x)).abs().max() > 1e-3  # pruning changed the output ...
    rec = comp.compensate(["blocks.1.v"])
    assert rec["writer"] == "blocks.1.w" and rec["alpha"] == 0.0
    assert (m(x) - dense(x)).abs().max() <= 1e-5  # ... and the refit puts it back exactly


def test_no_prune_means_no_refit_and_bit_identical_outputs():
    m, batches = _toy()
    dense = copy.deepcopy(m)
    comp = Compensator(m, batches, lambda mod, inp: mod(*inp))
    assert comp.compensate([]) is None
    x = torch.randn(2, 5, 4)
    assert torch.equal(m(x), dense(x))
