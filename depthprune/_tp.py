"""The one place that touches torch-pruning internals.

torch-pruning's private names (`_ElementWiseOp`, `module2node`, index maps, pruner registries)
change between releases; everything else in depthprune goes through the names here:

- `BasePruningFunc`, `ConvPruner`: what a width pruner derives from (`depthprune.layers.pruners`);
  `default_pruner`: torch-pruning's own pruner of a layer; `TP_NORMS`: the norms it prunes itself;
- `DependencyGraph`: torch-pruning's DepGraph, opened for `depthprune.channels` (pruners found by
  `get_pruner_of_module` rather than by class, a hook before its shape inference);
- `OPTYPE`, `HybridIndex`, `FlattenIndexMapping`, `SplitIndexMapping`: node types and channel maps;
- `build_dependency_graph`: one DepGraph trace; `leave_no_graph`;
- node accessors (`nodes`, `is_module_node`, `output_ports`, ...).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers as tp_helpers
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.pruner import function as tp_fn

from .offload import lean_trace

BasePruningFunc = tp_fn.BasePruningFunc
ConvPruner = tp_fn.ConvPruner
OPTYPE = tp_ops.OPTYPE
#: a channel index with the root channel it came from, as DepGraph's index maps take them
HybridIndex = tp_helpers._HybridIndex
FlattenIndexMapping = tp_index_mapping._FlattenIndexMapping
SplitIndexMapping = tp_index_mapping._SplitIndexMapping
#: norms torch-pruning has a pruner for
TP_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def default_pruner(module: nn.Module) -> BasePruningFunc | None:
    """torch-pruning's own channel pruner of a layer, None when it has none."""
    if isinstance(module, tp_ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        return tp_fn.PrunerBox[tp_ops.OPTYPE.DEPTHWISE_CONV]
    return tp_fn.PrunerBox.get(tp_ops.module2type(module))


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's DependencyGraph, opened for a subclass: `pruners` (found by an overridden
    `get_pruner_of_module`, not registered by class) count as pruning functions, and
    `before_index_mapping(nodes)` runs once the dependencies are built, before torch-pruning's
    shape inference and index mapping."""

    def __init__(self, pruners: Iterable[BasePruningFunc] = ()):
        super().__init__()
        self._extra_pruners = list(pruners)
        self._add_extra_pruning_fns()

    def _add_extra_pruning_fns(self) -> None:
        for p in self._extra_pruners:
            self._in_channel_pruning_fn.add(p.prune_in_channels)
            self._out_channel_pruning_fn.add(p.prune_out_channels)

    def register_customized_layer(self, layer_type_or_instance, layer_pruner) -> None:
        super().register_customized_layer(layer_type_or_instance, layer_pruner)
        self._add_extra_pruning_fns()  # torch-pruning rebuilds its sets of pruning functions here

    def _build_dependency(self, module2node):
        super()._build_dependency(module2node)
        self.before_index_mapping(list(module2node.values()))

    def before_index_mapping(self, nodes: list) -> None:
        """Called with every node before torch-pruning infers shapes and index maps."""


def _detached(v):
    return v.detach() if isinstance(v, torch.Tensor) and v.grad_fn is not None else v


@contextmanager
def leave_no_graph(model: nn.Module):
    """Around a forward with gradients (a trace, a gradient pass): tensors the model's own code
    keeps on its modules (LeViT's and EfficientFormer's attention-bias caches, a buffer it
    writes) are detached afterwards. Filled during such a forward they would hold its autograd
    graph, and ``copy.deepcopy`` of the model (the user's, or an export's) would fail on them."""
    try:
        yield
    finally:
        for m in model.modules():
            state = vars(m)  # attributes, and the dict of buffers among them
            for k, v in list(state.items()):
                if k in ("_parameters", "_modules"):
                    continue
                if isinstance(v, dict):
                    for key, t in list(v.items()):
                        v[key] = _detached(t)
                elif isinstance(v, list):
                    v[:] = [_detached(t) for t in v]
                else:
                    state[k] = _detached(v)


@contextmanager
def _contiguous_linear_inputs(model: nn.Module):
    """Around a trace: every ``nn.Linear`` reads a contiguous input. On a non-contiguous one
    (tokens transposed from a channels-first map) ``F.linear`` runs a matrix product, a view and
    a separate bias add, and DepGraph takes the bias add for the layer: the layer's input
    channels would meet its output's. Values are unchanged (a copy)."""
    def pre(module, args):
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None
    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_dependency_graph(dg: DependencyGraph, model: nn.Module, example_inputs: Any, forward_fn: Callable | None,
                           customized: dict, ignored: Sequence[nn.Module]) -> DependencyGraph:
    """Trace `model` into `dg`: ``customized`` (``{class: pruner}``) are layers traced as one node
    each, ``ignored`` layers are not traced as layers."""
    with torch.enable_grad(), lean_trace(model), _contiguous_linear_inputs(model), leave_no_graph(model):
        dg.build_dependency(model, example_inputs, forward_fn=forward_fn, ignored_layers=list(ignored),
                            customized_pruners=customized, verbose=False)
    return dg


# ------------------------------------------------------------------------------ node accessors
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


def is_multi_output(node) -> bool:
    """An op node with several output tensors (split, chunk, unbind)."""
    return is_op_node(node) and len(getattr(node.grad_fn, "_input_metadata", ())) > 1


def output_ports(consumer, producer) -> list[int]:
    """Which outputs of `producer` (a multi-output op such as a split) `consumer` reads."""
    fns = consumer.grad_fn.next_functions if consumer.grad_fn is not None else ()
    return sorted({nr for f, nr in fns if f is producer.grad_fn})
