"""The one place that touches torch-pruning internals.

torch-pruning's private names (`_ElementWiseOp`, `module2node`, pruner registries) change
between releases; everything else in depthprune goes through the functions here.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops as tp_ops
from torch_pruning.pruner import function as tp_fn


class ScaleNormPruner(tp_fn.BasePruningFunc):
    """Pruner for norms that hold one per-channel `weight` (RMSNorm of any library).

    Registering it makes each such norm a single DepGraph node instead of loose
    pow/mean/rsqrt/mul ops plus an unwrapped parameter.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
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

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]

    get_in_channels = get_out_channels


class LayoutPruner(tp_fn.BasePruningFunc):
    """Channel pruner for a transform registered with a `WeightLayout` (HF's transposed
    ``Conv1D``, ...): input and output channels are separate dimensions of its weight, the
    bias follows the output channels."""

    def __init__(self, layout):
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


def _keep(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable | None,
    scale_norm_classes: Iterable[type],
    layouts: dict | None = None,
) -> tp.DependencyGraph:
    """Trace `model` with DepGraph; `scale_norm_classes` get the single-node norm pruner,
    the classes of `layouts` (``{class: WeightLayout}``) a `LayoutPruner`."""
    pruner = ScaleNormPruner()
    customized = {cls: pruner for cls in scale_norm_classes}
    customized.update({cls: LayoutPruner(layout) for cls, layout in (layouts or {}).items()})
    dg = tp.DependencyGraph()
    with torch.enable_grad():
        dg.build_dependency(model, example_inputs, forward_fn=forward_fn,
                            customized_pruners=customized, verbose=False)
    return dg


def nodes(dg: tp.DependencyGraph) -> list:
    return list(dg.module2node.values())


def node_module(node) -> Any:
    return node.module


def node_grad_fn(node) -> Any:
    return node.grad_fn


def is_output_node(node) -> bool:
    return isinstance(node.module, tp_ops._OutputOp)


def is_op_node(node) -> bool:
    """True for DepGraph's synthetic op nodes (element-wise, concat, reshape, ...)."""
    m = node.module
    return isinstance(m, nn.Module) and type(m).__module__ == tp_ops.__name__


def is_concat_node(node) -> bool:
    return isinstance(node.module, tp_ops._ConcatOp)


def is_module_node(node) -> bool:
    return isinstance(node.module, nn.Module) and not is_op_node(node)


def pruner_of(dg: tp.DependencyGraph, module: nn.Module):
    return dg.get_pruner_of_module(module)


def out_pruning_fn(dg: tp.DependencyGraph, module: nn.Module) -> Callable:
    return dg.get_pruner_of_module(module).prune_out_channels


def in_pruning_fn(dg: tp.DependencyGraph, module: nn.Module) -> Callable:
    return dg.get_pruner_of_module(module).prune_in_channels


def group_items(group) -> list[tuple[Any, str, list[int], list[int]]]:
    """(module, 'out'|'in', idxs, root_idxs) for every member of a DepGraph group.

    Members that are DepGraph's synthetic ops (they hold no parameters) are dropped.
    """
    dg = group._DG
    out = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if not isinstance(module, nn.Module) or is_op_node(dep.target):
            continue
        if dep.handler in dg._out_channel_pruning_fn:
            direction = "out"
        elif dep.handler in dg._in_channel_pruning_fn:
            direction = "in"
        else:  # pragma: no cover - every registered handler is one of the two
            continue
        # Depthwise convs are pruned through a special out-channel function; it is
        # registered as a handler too, so the set lookup above already covers it.
        out.append((module, direction, [int(i) for i in idxs], [int(i) for i in item.root_idxs]))
    return out


_INDEX_MAPPING_OPS = (tp_ops._ConcatOp, tp_ops._SplitOp, tp_ops._UnbindOp, tp_ops._SliceOp)


def group_maps_indices(group) -> bool:
    """True when the group passes through concat/split/slice nodes, i.e. one root
    index may stand for several channels of the same layer."""
    return any(isinstance(item.dep.target.module, _INDEX_MAPPING_OPS) or
               isinstance(item.dep.source.module, _INDEX_MAPPING_OPS) for item in group)


def channels(dg: tp.DependencyGraph, module: nn.Module, direction: str) -> int | None:
    return dg.get_out_channels(module) if direction == "out" else dg.get_in_channels(module)


def get_group(dg: tp.DependencyGraph, module: nn.Module, direction: str, idxs: Sequence[int]):
    fn = out_pruning_fn(dg, module) if direction == "out" else in_pruning_fn(dg, module)
    return dg.get_pruning_group(module, fn, list(idxs))


def prune_module(module: nn.Module, direction: str, idxs: Sequence[int],
                 scale_norm_classes: Iterable[type] = (), layout=None) -> None:
    """Prune `idxs` of one module's output ('out') or input ('in') channels in place;
    `layout`: the module's registered `WeightLayout`, if any."""
    if layout is not None:
        pruner = LayoutPruner(layout)
    elif isinstance(module, tuple(scale_norm_classes)):
        pruner = ScaleNormPruner()
    elif isinstance(module, tp_ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruner = tp_fn.PrunerBox[tp_ops.OPTYPE.DEPTHWISE_CONV]
    else:
        pruner = tp_fn.PrunerBox.get(tp_ops.module2type(module))
    if pruner is None:
        raise TypeError(f"no channel pruner for {type(module).__name__}")
    fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
    fn(module, list(idxs))
