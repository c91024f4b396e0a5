"""Width pruners of the layer types torch-pruning does not model the way depth pruning needs
(torch-pruning ``BasePruningFunc`` subclasses, registered with their layer types in
`depthprune.layers.registry`).

A pruner may define ``channel_block(layer)`` (channels that must go together) and
``barrier(layer)`` (why the layer's width can never change, or None): `depthprune.channels`
reads both.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .._tp import BasePruningFunc, ConvPruner
from .layouts import WeightLayout


def _keep(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


class ScaleNormPruner(BasePruningFunc):
    """Pruner for norms that hold one per-channel `weight` (RMSNorm of any library).

    Registering it makes each such norm a single DepGraph node instead of loose
    pow/mean/rsqrt/mul ops plus an unwrapped parameter.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if getattr(layer, "weight", None) is None:  # an instance built without a scale (Gemma 3n's)
            return layer
        keep = _keep(layer.weight.shape[0], idxs)
        layer.weight = nn.Parameter(layer.weight.data[keep].clone(), requires_grad=layer.weight.requires_grad)
        for attr in ("hidden_size", "normalized_shape", "dim"):
            value = getattr(layer, attr, None)
            if isinstance(value, int):
                setattr(layer, attr, len(keep))
            elif isinstance(value, tuple) and len(value) == 1:
                setattr(layer, attr, (len(keep),))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        w = getattr(layer, "weight", None)
        return None if w is None else w.shape[0]

    get_in_channels = get_out_channels


class LayoutPruner(BasePruningFunc):
    """Channel pruner for a transform registered with a `WeightLayout` (HF's transposed
    ``Conv1D``, ...): input and output channels are separate dimensions of its weight, the
    bias follows the output channels."""

    def __init__(self, layout: WeightLayout):
        super().__init__()
        self.layout = layout

    def _cut(self, layer: nn.Module, idxs: Sequence[int], dim: int, attr: str | None, bias: bool) -> nn.Module:
        keep = torch.as_tensor(_keep(layer.weight.shape[dim], idxs), dtype=torch.long)
        w = layer.weight
        layer.weight = nn.Parameter(w.data.index_select(dim, keep).clone(), requires_grad=w.requires_grad)
        if bias and isinstance(getattr(layer, "bias", None), torch.Tensor):
            b = layer.bias
            layer.bias = nn.Parameter(b.data[keep].clone(), requires_grad=b.requires_grad)
        if attr is not None:
            setattr(layer, attr, len(keep))
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._cut(layer, idxs, self.layout.out_dim, self.layout.out_attr, bias=True)

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._cut(layer, idxs, self.layout.in_dim, self.layout.in_attr, bias=False)

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[self.layout.out_dim]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[self.layout.in_dim]


class GroupedConvPruner(ConvPruner):
    """Grouped convolutions (``1 < groups``, not plain depthwise): RegNet, ResNeXt, ...

    torch-pruning prunes their input and output channels independently and leaves ``groups``
    alone, which leaves a conv that no longer runs (``groups=55`` with 52 channels). When each
    group has as many input as output channels (``in_channels == out_channels``), input
    channel ``j`` and output channel ``j`` lie in the same group; like torch-pruning's depthwise
    pruner this one prunes both sides at once (``prune_in_channels is prune_out_channels``
    couples them in DepGraph), only whole groups of `channel_block` channels, and shrinks
    ``groups``. A grouped conv with different input and output widths has no such one-to-one
    correspondence: `barrier` names it and depth pruning never changes its width.
    """

    def channel_block(self, layer: nn.Module) -> int:
        """Channels that must go together: one group."""
        return layer.out_channels // layer.groups

    def barrier(self, layer: nn.Module) -> str | None:
        if layer.in_channels != layer.out_channels:
            return "a grouped convolution whose groups have different input and output widths"
        return None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if self.barrier(layer):
            raise ValueError(f"cannot change the width of {layer}: {self.barrier(layer)}")
        block = self.channel_block(layer)
        drop = sorted({int(i) for i in idxs})
        groups = {i // block for i in drop}
        if len(drop) != len(groups) * block:
            raise ValueError(f"{layer}: only whole groups of {block} channels can be pruned")
        keep = _keep(layer.out_channels, drop)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.out_channels = layer.in_channels = len(keep)
        layer.groups -= len(groups)
        return layer

    prune_in_channels = prune_out_channels


def is_grouped_conv(module: nn.Module) -> bool:
    """A convolution with groups that is not a plain depthwise conv (one channel per group)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and not module.groups == module.in_channels == module.out_channels)
