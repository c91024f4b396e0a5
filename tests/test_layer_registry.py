"""A layer type defined outside depthprune, registered through `depthprune.layers`, prunes exactly.

Two layer types only this file knows: `TLinear` (``y = x @ W + b`` with ``W`` stored ``[in, out]``,
its widths in ``n_in``/``n_out``: a weight layout torch-pruning cannot read) and `Gain` (one
per-channel scale in a parameter named ``gain``, with a width pruner written here). Depth pruning
through them reconciles widths on both sides; the pruned model equals a hand-built one, and the
parameter counts are exact.
"""
import copy
from typing import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from depthprune import layers
from depthprune.depth import DepthPruner
from depthprune.layers import NORM, TRANSFORM, LayoutPruner, WeightLayout, register_layer, unregister_layer
from test_channels import prune_exactly, removed


class TLinear(nn.Module):
    """``y = x @ weight + bias`` with ``weight: [in, out]``, on the tokens folded into rows (one
    product, then the output's shape: the last op of the layer makes its output)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, self.n_in), self.weight)
        return out.view(*x.shape[:-1], self.n_out)


class Gain(nn.Module):
    """A per-channel scale kept in ``gain`` (no ``weight``: the built-in norm pruner does not apply)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.gain = nn.Parameter(torch.rand(features) + 0.5)

    def forward(self, x):
        return x * self.gain


class GainPruner(layers.BasePruningFunc):
    def prune_out_channels(self, layer: Gain, idxs: Sequence[int]) -> Gain:
        drop = {int(i) for i in idxs}
        keep = [i for i in range(layer.features) if i not in drop]
        layer.gain = nn.Parameter(layer.gain.data[keep].clone())
        layer.features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: Gain) -> int:
        return layer.features

    get_in_channels = get_out_channels


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Gain(16)
        self.up = TLinear(16, 32)
        self.act = nn.GELU()
        self.down = TLinear(32, 16)

    def forward(self, h):
        return h + self.down(self.act(self.up(self.norm(h))))


class Net(nn.Module):
    """stem (8 -> 16) -> residual block through Gain and two TLinear -> head (16 -> 5)."""

    def __init__(self):
        super().__init__()
        self.stem = TLinear(8, 16)
        self.block = Block()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.fixture
def registered():
    """TLinear and Gain registered for one test (the registry is process-wide)."""
    entries = [register_layer(TLinear, TRANSFORM, layout=WeightLayout(in_dim=0, out_dim=1, in_attr="n_in",
                                                                       out_attr="n_out")),
               register_layer(Gain, NORM, pruner=GainPruner())]
    yield entries
    for e in entries:
        unregister_layer(e)


def net():
    torch.manual_seed(0)
    return Net().eval()


def replayed(step, base, x):
    """The step replayed on a fresh copy of the base model (the plan alone rebuilds it)."""
    dp = DepthPruner(copy.deepcopy(base), (x,))
    dp.replay([step.as_dict()])
    return dp.model


@pytest.mark.unit
def test_the_registry_answers_for_the_registered_types(registered):
    t, g = TLinear(3, 5), Gain(4)
    assert layers.layer_type(t) is registered[0] and layers.module_kind(t) == TRANSFORM
    assert layers.transform_widths(t) == (3, 5) and layers.affine_widths(t) == (3, 5)
    assert layers.affine_transposed(t) and layers.affine_weight(t).shape == (5, 3)
    assert (layers.channel_dim(t, "in", "weight"), layers.channel_dim(t, "out", "weight"),
            layers.channel_dim(t, "in", "bias"), layers.channel_dim(t, "out", "bias")) == (0, 1, None, 0)
    assert isinstance(layers.width_pruner(t), LayoutPruner)
    assert layers.module_kind(g) == NORM and isinstance(layers.width_pruner(g), GainPruner)
    assert set(layers.class_pruners(Net())) == {TLinear, Gain}  # each one DepGraph node

    class Sub(TLinear):  # a layout names one class: a subclass may keep its weight otherwise
        pass
    assert layers.layer_type(Sub(3, 5)) is None

    layers.prune_channels(t, "in", [1])
    layers.prune_channels(t, "out", [0, 4])
    assert (t.n_in, t.n_out, tuple(t.weight.shape), tuple(t.bias.shape)) == (2, 3, (2, 3), (3,))


@pytest.mark.unit
def test_unregistered_the_custom_layers_are_no_units():
    dp = DepthPruner(net(), (torch.randn(2, 4, 8),))
    assert layers.layer_type(TLinear(2, 2)) is None
    assert "block.down" not in dp.units() and dp.units() == ["head"]


@pytest.mark.unit
def test_a_registered_transform_is_pruned_with_its_producer_narrowed(registered):
    model = net()
    with torch.no_grad():  # up's first 16 outputs matter most: the other 16 go
        model.block.up.weight[:, :16] *= 10
    ref = copy.deepcopy(model)
    x = torch.randn(2, 4, 8)
    dp = DepthPruner(model, (x,))
    assert {"stem", "block.up", "block.down", "head"} <= set(dp.units())
    step = prune_exactly(dp, "block.down")  # 32 -> 16: 16 of its inputs, i.e. of up's outputs
    assert removed(step, "block.up") == list(range(16, 32))
    # down (32*16 + 16) and up's 16 output columns and biases (16*16 + 16)
    assert step.params_removed == 528 + 272
    up = dp.model.block.up
    assert (up.n_in, up.n_out, tuple(up.weight.shape)) == (16, 16, (16, 16))
    kept = list(range(16))
    with torch.no_grad():  # down is an identity; the GELU before it stays
        h = ref.stem(x)
        u = F.gelu((h * ref.block.norm.gain) @ ref.block.up.weight[:, kept] + ref.block.up.bias[kept])
        want = ref.head(h + u)
        assert torch.allclose(dp.model(x), want, atol=1e-5, rtol=0)
        assert torch.equal(replayed(step, ref, x)(x), dp.model(x))


@pytest.mark.unit
def test_the_residual_width_follows_through_every_registered_type(registered):
    model = net()
    with torch.no_grad():  # the head reads residual channels 0..7 most: 8..15 go
        model.head.weight[:, :8] *= 100
    ref = copy.deepcopy(model)
    x = torch.randn(2, 4, 8)
    dp = DepthPruner(model, (x,))
    step = prune_exactly(dp, "stem")  # 8 -> 16: 8 residual channels go, everywhere
    gone = list(range(8, 16))
    for path in ("stem", "block.norm", "block.up", "block.down", "head"):
        assert removed(step, path) == gone, path
    # stem (8*16 + 16), Gain (8), up's rows (8*32), down's columns and biases (8*32 + 8), head (5*8)
    assert step.params_removed == 144 + 8 + 256 + 264 + 40
    b = dp.model.block
    assert (b.norm.features, b.up.n_in, b.down.n_out, dp.model.head.in_features) == (8, 8, 8, 8)
    k = list(range(8))
    with torch.no_grad():  # the stem is an identity: x is the residual stream's 8 kept channels
        r = ref.block
        u = F.gelu((x * r.norm.gain[k]) @ r.up.weight[k] + r.up.bias)
        h = x + u @ r.down.weight[:, k] + r.down.bias[k]
        want = F.linear(h, ref.head.weight[:, k], ref.head.bias)
        assert torch.allclose(dp.model(x), want, atol=1e-5, rtol=0)
        assert torch.equal(replayed(step, ref, x)(x), dp.model(x))
