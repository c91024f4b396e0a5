"""The default width-reconciliation index score, computed a few channels at a time."""
import pytest
import torch
import torch.nn as nn

from depthprune.depth.reconcile import magnitude_score


@pytest.mark.unit
@pytest.mark.parametrize("direction", ["out", "in"])
def test_magnitude_score_in_chunks_equals_whole_sum(direction):
    torch.manual_seed(0)
    lin = nn.Linear(600, 8192, bias=True) if direction == "in" else nn.Linear(8192, 600, bias=True)
    n = 600
    idxs = list(range(0, n, 1))  # 600 channels of 8192 weights: more than one chunk
    got = magnitude_score(lin, direction, idxs)
    w = lin.weight.detach().double()
    if direction == "out":
        want = w.pow(2).sum(1) + lin.bias.detach().double().pow(2)
    else:
        want = w.pow(2).sum(0)
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
