"""The one place that touches torch-pruning internals.

torch-pruning's private names (`_ElementWiseOp`, `module2node`, pruner registries) change
between releases; everything else in depthprune goes through the functions here.

What depthprune adds on top of torch-pruning 1.6 (each measured on a model it broke):

- a registry of layer pruners consulted before torch-pruning's own (`register_layer_pruner`),
  with one entry for grouped convolutions (whole groups only);
- exact channel correspondences through concatenations, splits and reshapes, read from the
  autograd nodes of the trace instead of torch-pruning's shape inference (which loses the
  piece a consumer takes from a `chunk`, and divides by zero on a channel shuffle);
- `ChannelGroup`: DepGraph's propagation that keeps every root of every channel it reaches,
  so channels that must go together (one value concatenated twice, one group of a grouped
  conv, one offset of every `chunk` piece) are found from one traversal, and channels that
  cannot be removed consistently (a reshape that mixes channels, a fixed-size split) are
  named.
"""
from __future__ import annotations

from contextlib import contextmanager
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers as tp_helpers
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.pruner import function as tp_fn

from .offload import lean_trace


class ScaleNormPruner(tp_fn.BasePruningFunc):
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


# ------------------------------------------------------------------------------ layer pruners
class GroupedConvPruner(tp_fn.ConvPruner):
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


#: ``(match, pruner)`` pairs consulted before torch-pruning's own registry, first match first:
#: one entry per layer type whose channels torch-pruning does not model the way depth
#: pruning needs. A pruner may define ``channel_block(layer)`` (channels that go together)
#: and ``barrier(layer)`` (why its width can never change, or None).
LAYER_PRUNERS: list[tuple[Callable[[nn.Module], bool], tp_fn.BasePruningFunc]] = []


def register_layer_pruner(match: Callable[[nn.Module], bool], pruner: tp_fn.BasePruningFunc) -> None:
    """Prune every module for which ``match(module)`` holds with ``pruner`` (in DepGraph and in
    `prune_module`)."""
    LAYER_PRUNERS.append((match, pruner))


register_layer_pruner(is_grouped_conv, GroupedConvPruner())


def registered_pruner(module: Any) -> tp_fn.BasePruningFunc | None:
    if isinstance(module, nn.Module):
        for match, pruner in LAYER_PRUNERS:
            if match(module):
                return pruner
    return None


# ------------------------------------------------------------------------------ channel maps
class _Runs:
    """Channel correspondence along one DepGraph edge: runs ``(src, dst, length)`` map source
    channel ``src + t`` to target channel ``dst + t``. A channel may lie in several runs (one
    value concatenated twice, two pieces of one split added)."""

    def __init__(self, runs: list[tuple[int, int, int]], reverse: bool = False):
        self.runs = [(b, a, n) for a, b, n in runs] if reverse else list(runs)

    def __call__(self, idxs):
        out = []
        for h in idxs:
            for src, dst, n in self.runs:
                if src <= h.idx < src + n:
                    out.append(tp_helpers._HybridIndex(idx=dst + h.idx - src, root_idx=h.root_idx))
        return out


@dataclass(frozen=True)
class Tie:
    """Channels of one node that must be removed together, in sets of `size`: consecutive
    blocks (``stride == 0``: a group of a grouped conv, ``[g*size, (g+1)*size)``) or one offset
    of every equal piece (``stride`` = piece width: a `chunk`, ``{o, o+stride, ...}``)."""

    size: int
    stride: int = 0

    def key(self, idx: torch.Tensor) -> torch.Tensor:
        """Which set each channel index belongs to."""
        return idx % self.stride if self.stride else idx // self.size


def _block_tie(block: int) -> Tie:
    return Tie(block)


def _stride_tie(piece: int, width: int) -> Tie:
    return Tie(width // piece, stride=piece)


def _saved_dim(fn) -> int | None:
    """The ``dim`` an autograd node saved; negative dims come back as unsigned 64-bit."""
    dim = getattr(fn, "_saved_dim", None)
    return dim - 2 ** 64 if dim is not None and dim >= 2 ** 63 else dim


def _meta_shape(fn, nr: int) -> tuple | None:
    """Shape of output ``nr`` of autograd node ``fn`` (a leaf: the variable's)."""
    if fn is None:
        return None
    if hasattr(fn, "variable"):
        return tuple(fn.variable.shape)
    meta = getattr(fn, "_input_metadata", None)
    if meta is None or nr >= len(meta):
        return None
    return tuple(meta[nr].shape)


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's DependencyGraph with depthprune's layer pruners and exact channel maps.

    After `build_dependency`:

    - ``width_barriers``: node -> why no channel reaching it can be removed consistently;
    - ``channel_ties``: node -> `Tie` of channels that go together;
    - ``index_mapped``: nodes through which channel indices are renumbered or tied.

    Concatenation, split and reshape nodes are taken over from torch-pruning's shape inference
    (their node type becomes element-wise, so its heuristics skip them) and get exact maps.
    """

    def __init__(self):
        super().__init__()
        for _, p in LAYER_PRUNERS:
            self._in_channel_pruning_fn.add(p.prune_in_channels)
            self._out_channel_pruning_fn.add(p.prune_out_channels)
        self.width_barriers: dict = {}
        self.channel_ties: dict = {}
        self.index_mapped: set = set()
        self._taken_over: dict = {}

    def get_pruner_of_module(self, module):
        return registered_pruner(module) or super().get_pruner_of_module(module)

    def _build_dependency(self, module2node):
        super()._build_dependency(module2node)
        # Runs before torch-pruning's shape inference and index mapping: hide the nodes whose
        # channel maps are computed here.
        for node in module2node.values():
            if node.type in (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.RESHAPE):
                self._taken_over[node] = node.type
                node.type = tp_ops.OPTYPE.ELEMENTWISE

    def build_dependency(self, *args, **kwargs) -> "DependencyGraph":
        super().build_dependency(*args, **kwargs)
        self._exact_channel_maps()
        return self

    # -- channel dims ---------------------------------------------------------------------
    def channel_dim(self, ndim: int) -> int:
        """The channel dimension of a traced tensor: the last one of (batch, tokens, features)
        tensors in models whose Linear layers see three dimensions, else dim 1 (N, C, ...)."""
        return ndim - 1 if ndim == 3 and not self._2d_4d else 1

    def _split_pieces(self, node) -> list[tuple[int, int]] | None:
        """(offset, size) of each output of a split along the channel dim, None otherwise."""
        fn = node.grad_fn
        meta = getattr(fn, "_input_metadata", None)
        if not meta:
            return None
        ndim = len(meta[0].shape)
        dim = _saved_dim(fn)
        if dim is None or dim % ndim != self.channel_dim(ndim):
            return None
        pieces, off = [], 0
        for m in meta:
            size = int(m.shape[dim % ndim])
            pieces.append((off, size))
            off += size
        return pieces

    def _cat_operands(self, node) -> list[tuple[Any, int, int, int]] | None:
        """(producer grad_fn, output nr, offset, size) per operand of a channel concatenation,
        None when the concatenation is along another dim."""
        fn = node.grad_fn
        out = _meta_shape(fn, 0)
        dim = _saved_dim(fn)
        if out is None or dim is None or dim % len(out) != self.channel_dim(len(out)):
            return None
        dim = dim % len(out)
        sizes = []
        for f, nr in fn.next_functions:
            shape = _meta_shape(f, nr)
            sizes.append(None if shape is None else int(shape[dim]))
        unknown = [i for i, s in enumerate(sizes) if s is None]
        if len(unknown) == 1:  # one constant operand (no autograd node): the rest of the width
            sizes[unknown[0]] = out[dim] - sum(s for s in sizes if s is not None)
        elif unknown and out[dim] != sum(s for s in sizes if s is not None):
            self.width_barriers[node] = "a concatenation with constant operands of unknown width"
        operands, off = [], 0
        for (f, nr), size in zip(fn.next_functions, sizes):
            size = size or 0
            operands.append((f, nr, off, size))
            off += size
        return operands

    def _nearest_channels(self, node, upstream: bool, limit: int = 64) -> int | None:
        """Channel count of the nearest layer before (``upstream``: its outputs) or after (its
        inputs) `node`, through element-wise ops only (activations, pooling, permutes); None when
        a concatenation, split or reshape comes first."""
        seen, todo = set(), list(node.inputs if upstream else node.outputs)
        while todo and len(seen) < limit:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if is_module_node(n):
                return self.get_out_channels(n) if upstream else self.get_in_channels(n)
            if n.type == tp_ops.OPTYPE.ELEMENTWISE and n not in self._taken_over:
                todo.extend(n.inputs if upstream else n.outputs)
        return None

    def _reshape_map(self, node):
        """Classify a reshape by its input and output shapes: channel-preserving (no map),
        flatten of the dims after the channel dim (stride map), the reverse, or channel-mixing.

        Which dim holds the channels is read from the neighbours: channels-first (dim 1: conv
        feature maps, a flatten before a classifier) or channels-last (the last dim: what a
        Linear reads, also on NHWC maps as in ConvNeXt), whichever matches the channel counts of
        the nearest layers; when both match, the model's convention (`channel_dim`) decides.
        """
        fn = node.grad_fn
        src = fn.next_functions[0] if fn.next_functions else (None, 0)
        shape_in, shape_out = _meta_shape(*src), _meta_shape(fn, 0)
        if not shape_in or not shape_out:
            return "barrier", "a reshape of unknown shape"
        before, after = self._nearest_channels(node, True), self._nearest_channels(node, False)

        def plausible(di, do):
            return (di < len(shape_in) and do < len(shape_out) and before in (None, shape_in[di])
                    and after in (None, shape_out[do]))
        def confirmed(di, do):  # a neighbour's channel count sits at that dim and nowhere else
            return (before is not None and list(shape_in).count(before) == 1 and shape_in[di] == before) or \
                   (after is not None and list(shape_out).count(after) == 1 and shape_out[do] == after)
        usual = (self.channel_dim(len(shape_in)), self.channel_dim(len(shape_out)))
        readings = [r for r in (usual, (1, 1), (len(shape_in) - 1, len(shape_out) - 1)) if plausible(*r)]
        if not readings:
            return "barrier", "a reshape whose channel dimension could not be identified"
        # The model's convention first; another reading only where a neighbour pins the channels
        # to it: channels-first maps flattened to (N, C, HW) in a channels-last model (a
        # depthwise conv inside a transformer MLP, PVT v2's and SegFormer's Mix-FFN).
        how = self._reshape_kind(shape_in, shape_out, *readings[0])
        for r in readings[1:]:
            if how[0] != "barrier":
                break
            if confirmed(*r):
                other = self._reshape_kind(shape_in, shape_out, *r)
                how = other if other[0] != "barrier" else how
        return how

    @staticmethod
    def _reshape_kind(shape_in, shape_out, di: int, do: int):
        """`_reshape_map`'s classification for channels at ``di`` in and ``do`` out."""
        def prod(xs):
            p = 1
            for x in xs:
                p *= int(x)
            return p
        pre_i, c_i, post_i = prod(shape_in[:di]), int(shape_in[di]), prod(shape_in[di + 1:])
        pre_o, c_o, post_o = prod(shape_out[:do]), int(shape_out[do]), prod(shape_out[do + 1:])
        if pre_i == pre_o and c_i == c_o and post_i == post_o:
            return "same", None
        if pre_i == pre_o and post_o == 1 and c_o == c_i * post_i:
            return "flatten", post_i  # input channel j -> output channels [j*post_i, (j+1)*post_i)
        if pre_i == pre_o and post_i == 1 and c_i == c_o * post_o:
            return "unflatten", post_o  # input channel x -> output channel x // post_o
        return "barrier", "a reshape that mixes channels with other dimensions (e.g. a channel shuffle)"

    def _set_map(self, src, dst, forward, backward) -> None:
        """Install the maps of edge src -> dst (both dependency directions)."""
        for dep in src.dependencies:
            if dep.target is dst:
                dep.index_mapping = [forward, None]
        for dep in dst.dependencies:
            if dep.target is src:
                dep.index_mapping = [backward, None]

    def _exact_channel_maps(self) -> None:
        for node in self.module2node.values():
            pruner = registered_pruner(node.module)
            if pruner is not None:
                reason = pruner.barrier(node.module) if hasattr(pruner, "barrier") else None
                if reason:
                    self.width_barriers[node] = reason
                elif hasattr(pruner, "channel_block") and pruner.channel_block(node.module) > 1:
                    self.channel_ties[node] = _block_tie(pruner.channel_block(node.module))
                    self.index_mapped.add(node)
            elif node.type in (tp_ops.OPTYPE.SLICE, tp_ops.OPTYPE.UNBIND):
                meta = _meta_shape(node.grad_fn.next_functions[0][0], node.grad_fn.next_functions[0][1]) \
                    if node.grad_fn.next_functions else None
                dim = _saved_dim(node.grad_fn)
                if meta is None or dim is None or dim % len(meta) == self.channel_dim(len(meta)):
                    self.width_barriers[node] = "a slice of the channel dimension with fixed bounds"
        for node, kind in self._taken_over.items():
            if kind == tp_ops.OPTYPE.RESHAPE:
                how, arg = self._reshape_map(node)
                if how == "barrier":
                    self.width_barriers[node] = arg
                elif how in ("flatten", "unflatten"):
                    self.index_mapped.add(node)
                    wide = tp_index_mapping._FlattenIndexMapping
                    for src in node.inputs:
                        self._set_map(src, node, wide(arg, reverse=how == "unflatten"),
                                      wide(arg, reverse=how == "flatten"))
            elif kind == tp_ops.OPTYPE.SPLIT:
                pieces = self._split_pieces(node)
                if pieces is None:
                    continue
                self.index_mapped.add(node)
                sizes = {s for _, s in pieces}
                width = sum(s for _, s in pieces)
                if type(node.grad_fn).__name__ == "SplitBackward0" and len(sizes) == 1:
                    # equal pieces (`chunk`): they follow the input width if every piece
                    # loses the same offsets
                    self.channel_ties[node] = _stride_tie(pieces[0][1], width)
                else:
                    self.width_barriers[node] = "a split into pieces of fixed sizes"
                for dst in set(node.outputs):
                    if self._taken_over.get(dst) == tp_ops.OPTYPE.CONCAT and self._cat_operands(dst) is not None:
                        continue  # set from the concatenation's side
                    nrs = [nr for f, nr in (dst.grad_fn.next_functions or ()) if f is node.grad_fn]
                    if not nrs:
                        self.width_barriers[node] = "a split whose consumers could not be matched to its pieces"
                        continue
                    runs = [(pieces[nr][0], 0, pieces[nr][1]) for nr in nrs]
                    self._set_map(node, dst, _Runs(runs), _Runs(runs, reverse=True))
            elif kind == tp_ops.OPTYPE.CONCAT:
                operands = self._cat_operands(node)
                if operands is None:
                    continue
                self.index_mapped.add(node)
                for src in set(node.inputs):
                    pieces = self._split_pieces(src) if self._taken_over.get(src) == tp_ops.OPTYPE.SPLIT else None
                    runs = [((pieces[nr][0] if pieces else 0), off, size)
                            for f, nr, off, size in operands if f is src.grad_fn]
                    if not runs:
                        self.width_barriers[node] = "a concatenation whose operands could not be matched"
                        continue
                    self._set_map(src, node, _Runs(runs), _Runs(runs, reverse=True))


def not_tensor_layers(model: nn.Module, example_inputs, forward_fn: Callable) -> list[nn.Module]:
    """Subclasses of Linear/conv layers with their own forward whose output is not a tensor (a
    router subclassing Linear that returns scores and indices): not layers DepGraph can trace.
    Found by running the model once, only when such subclasses exist."""
    bases = (nn.Linear, nn.modules.conv._ConvNd)
    odd = [m for m in model.modules() if isinstance(m, bases) and
           all(type(m).forward is not b.forward for b in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))]
    if not odd:
        return []
    found: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: None if isinstance(out, torch.Tensor) or mod in found
                                     else found.append(mod)) for m in odd]
    try:
        with torch.no_grad():
            forward_fn(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


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


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable | None,
    scale_norm_classes: Iterable[type],
    layouts: dict | None = None,
    ignored: Sequence[nn.Module] | None = None,
) -> DependencyGraph:
    """Trace `model` with DepGraph; `scale_norm_classes` get the single-node norm pruner,
    the classes of `layouts` (``{class: WeightLayout}``) a `LayoutPruner`; ``ignored`` layers
    are not traced as layers (default: `not_tensor_layers`, found here with ``forward_fn``)."""
    if ignored is None:
        ignored = not_tensor_layers(model, example_inputs, forward_fn) if forward_fn is not None else []
    pruner = ScaleNormPruner()
    customized = {cls: pruner for cls in scale_norm_classes}
    customized.update({cls: LayoutPruner(layout) for cls, layout in (layouts or {}).items()})
    dg = DependencyGraph()
    with torch.enable_grad(), lean_trace(model), _contiguous_linear_inputs(model), leave_no_graph(model):
        dg.build_dependency(model, example_inputs, forward_fn=forward_fn, ignored_layers=list(ignored),
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


def is_multi_output(node) -> bool:
    """An op node with several output tensors (split, chunk, unbind)."""
    return is_op_node(node) and len(getattr(node.grad_fn, "_input_metadata", ())) > 1


def output_ports(consumer, producer) -> list[int]:
    """Which outputs of `producer` (a multi-output op such as a split) `consumer` reads."""
    fns = consumer.grad_fn.next_functions if consumer.grad_fn is not None else ()
    return sorted({nr for f, nr in fns if f is producer.grad_fn})


def channels(dg: tp.DependencyGraph, module: nn.Module, direction: str) -> int | None:
    return dg.get_out_channels(module) if direction == "out" else dg.get_in_channels(module)


def _components(n: int, group: torch.Tensor, root: torch.Tensor, groups: int) -> torch.Tensor:
    """Connected components of roots ``0..n-1`` joined by shared groups (root ``root[i]`` is in
    group ``group[i]``): each root's label is the smallest root of its component. Minimum
    labels spread through the groups, with pointer jumping, until they settle."""
    lab = torch.arange(n)
    while True:
        low = torch.full((groups,), n, dtype=torch.long).scatter_reduce(0, group, lab[root], "amin")
        new = lab.scatter_reduce(0, root, low[group], "amin")
        new = new[new]
        if torch.equal(new, lab):
            return lab
        lab = new


class ChannelGroup:
    """Everything that pruning channels ``0..n-1`` of `module` (``direction`` 'out' or 'in')
    drags along, as DepGraph propagates it: for every node and pruning handler reached, which
    of its channels each *root* channel reaches. torch-pruning's own groups keep one root per
    channel; keeping all of them is what ties channels together. One traversal for all roots
    (not one group per channel), on (channel, root) pairs held as tensors.

    `classes` partitions the roots into the sets that can only be removed together and says
    which sets cannot be removed at all (and why); `items` lists, for chosen roots, the
    channels of every parameter-holding layer to remove.
    """

    def __init__(self, dg: DependencyGraph, module: nn.Module, direction: str, n: int):
        self.dg, self.n = dg, n
        root = dg.module2node[module]
        pruner = dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
        self.lost_roots = False
        ar = torch.arange(n)
        #: (node, handler) -> codes ``channel * n + root`` of the pairs reached (unique)
        self.facts: dict[tuple, torch.Tensor] = {}
        # DepGraph's propagation on batches of (channel, root) pairs, breadth first; what reaches
        # a node is merged until the node's turn, so each node is expanded few times.
        pending: dict[tuple, list] = {(root, fn): [ar * n + ar]}
        bits: dict[tuple, torch.Tensor] = {}  # membership bitmaps of the keys reached densely
        queue = deque(pending)
        while queue:
            key = queue.popleft()
            codes = pending.pop(key)
            codes = torch.unique(torch.cat(codes)) if len(codes) > 1 or len(codes[0]) > 1 else codes[0]
            old = self.facts.get(key)
            if old is not None:
                codes = self._new(key, codes, old, bits, n)
                if not len(codes):
                    continue
                self.facts[key] = torch.cat([old, codes])
            else:
                self.facts[key] = codes
            node, fn = key
            idx, roots = codes // n, codes % n
            span = (int(idx.min()), int(idx.max()))
            for dep in node.dependencies:
                if not dep.is_triggered_by(fn):
                    continue
                i2, r2 = idx, roots
                for mapping in dep.index_mapping:
                    if mapping is not None and len(i2):
                        i2, r2 = self._map(mapping, i2, r2, span if i2 is idx else None)
                if not len(i2):
                    continue
                target = (dep.target, dep.handler)
                if target in pending:
                    pending[target].append(i2 * n + r2)
                else:
                    pending[target] = [i2 * n + r2]
                    queue.append(target)

    @staticmethod
    def _new(key, codes: torch.Tensor, old: torch.Tensor, bits: dict, n: int) -> torch.Tensor:
        """The ``codes`` not in ``old`` (both distinct). A key reached by many (channel, root)
        pairs (attention ties every channel of a head to every root) is revisited often: its
        membership is kept as a bitmap over the codes of its channels so far, once the bitmap is
        no bigger than the codes (a sort-based ``isin`` per visit cost minutes)."""
        mask = bits.get(key)
        top = int(codes.max()) + 1
        if mask is not None and top > len(mask):
            mask = None
        if mask is None:
            size = (max(top, int(old.max()) + 1) + n - 1) // n * n  # whole channels' codes
            if len(old) < 4096 or size > 8 * len(old):
                return codes[~torch.isin(codes, old, assume_unique=True)]
            mask = bits[key] = torch.zeros(size, dtype=torch.bool)
            mask[old] = True
        codes = codes[~mask[codes]]
        mask[codes] = True
        return codes

    def _map(self, mapping, idx: torch.Tensor, roots: torch.Tensor,
             span: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply one DepGraph index map to (channel, root) pairs; ``span`` (lowest, highest
        channel), when known, skips the runs that cannot match without touching the tensors."""
        if isinstance(mapping, _Runs):
            runs = mapping.runs if span is None else \
                [(a, b, k) for a, b, k in mapping.runs if a <= span[1] and a + k > span[0]]
            if not runs:
                return idx[:0], roots[:0]
            if len(runs) == 1 and span is not None and runs[0][0] <= span[0] and span[1] < runs[0][0] + runs[0][2]:
                return idx + (runs[0][1] - runs[0][0]), roots  # the whole batch lies in one run
            parts_i, parts_r = [], []
            for src, dst, length in runs:
                keep = (idx >= src) & (idx < src + length)
                parts_i.append(idx[keep] - src + dst)
                parts_r.append(roots[keep])
            return torch.cat(parts_i), torch.cat(parts_r)
        if isinstance(mapping, tp_index_mapping._FlattenIndexMapping):
            stride = mapping._stride
            if mapping.reverse:
                return idx // stride, roots
            return ((idx * stride).repeat_interleave(stride) + torch.arange(stride).repeat(len(idx)),
                    roots.repeat_interleave(stride))
        if isinstance(mapping, tp_index_mapping._SplitIndexMapping):  # a slice [lo, hi) of the channels
            lo, hi = int(mapping.offset[0]), int(mapping.offset[1])
            if mapping.reverse:
                return idx + lo, roots
            keep = (idx >= lo) & (idx < hi)
            return idx[keep] - lo, roots[keep]
        # any other torch-pruning map: element by element
        mapped = mapping([tp_helpers._HybridIndex(idx=int(i), root_idx=int(r)) for i, r in zip(idx, roots)])
        if any(h.root_idx is None for h in mapped):  # torch-pruning's grouped-query map drops roots
            self.lost_roots = True
            mapped = [h for h in mapped if h.root_idx is not None]
        return (torch.as_tensor([h.idx for h in mapped], dtype=torch.long),
                torch.as_tensor([h.root_idx for h in mapped], dtype=torch.long))

    @property
    def maps_indices(self) -> bool:
        """True when channel indices are renumbered or tied on the way (concatenations,
        splits, reshapes, grouped convs): one root may stand for several channels of a layer."""
        return any(node in self.dg.index_mapped for node, _ in self.facts)

    def classes(self) -> tuple[list[list[int]], Counter]:
        """``(removable, refused)``: removable classes of roots (sorted lists), and a count of
        refused roots per reason."""
        n = self.n
        groups: list[torch.Tensor] = []  # per (node, key): an id shared by the roots that reach it
        members_of: list[torch.Tensor] = []
        count = 0

        def share(keys: torch.Tensor, roots: torch.Tensor) -> None:
            """The roots that share a key go together."""
            nonlocal count
            pairs = torch.unique(keys * n + roots)
            _, gid = torch.unique_consecutive(pairs // n, return_inverse=True)
            groups.append(gid + count)
            members_of.append(pairs % n)
            count += int(gid.max()) + 1 if len(gid) else 0

        for (node, _), codes in self.facts.items():
            idx, roots = codes // n, codes % n
            share(idx, roots)  # one channel reached from several roots
            tie = self.dg.channel_ties.get(node)
            if tie is not None:
                share(tie.key(idx), roots)
        cls = _components(n, torch.cat(groups), torch.cat(members_of), count) if groups else torch.arange(n)
        bad: dict[int, str] = {}
        for (node, _), codes in self.facts.items():
            reason = self.dg.width_barriers.get(node)
            tie = self.dg.channel_ties.get(node)
            if reason is not None:
                for c in torch.unique(cls[codes % n]).tolist():
                    bad.setdefault(c, reason)
            elif tie is not None:  # every set a class touches must be whole
                pairs = torch.unique(cls[codes % n] * (codes.max() + 1) + codes // n)
                c, idx = pairs // (codes.max() + 1), pairs % (codes.max() + 1)
                sets, counts = torch.unique(c * (int(idx.max()) + 1) + tie.key(idx), return_counts=True)
                for s in torch.unique(sets[counts != tie.size] // (int(idx.max()) + 1)).tolist():
                    bad.setdefault(s, "channels tied to channels outside this group "
                                      "(a grouped convolution or split piece only partly reached)")
        members: dict[int, list[int]] = {}
        for r, c in enumerate(cls.tolist()):
            members.setdefault(c, []).append(r)
        if self.lost_roots:
            bad = {c: "channels whose origin torch-pruning does not track" for c in members}
        removable = [m for c, m in members.items() if c not in bad]
        refused = Counter()
        for c, reason in bad.items():
            refused[reason] += len(members[c])
        return sorted(removable), refused

    def layer_tables(self) -> list[tuple[nn.Module, str, list[int], list[int]]]:
        """(module, 'out'|'in', channels, one root of each channel) for every parameter-holding
        layer reached (the roots of one channel are always in one class)."""
        out = []
        for (node, handler), codes in self.facts.items():
            if not is_module_node(node):
                continue
            direction = "out" if self.dg.is_out_channel_pruning_fn(handler) else "in"
            codes = torch.sort(codes).values
            idx = codes // self.n
            first = torch.ones(len(idx), dtype=torch.bool)
            first[1:] = idx[1:] != idx[:-1]
            out.append((node.module, direction, idx[first].tolist(), (codes[first] % self.n).tolist()))
        return out

    def items(self, roots: Iterable[int]) -> list[tuple[nn.Module, str, list[int]]]:
        """(module, direction, channels) to remove so that the roots `roots` go."""
        chosen = torch.zeros(self.n, dtype=torch.bool)
        chosen[torch.as_tensor(sorted(roots), dtype=torch.long)] = True
        out = []
        for (node, handler), codes in self.facts.items():
            if not is_module_node(node):
                continue
            idxs = torch.unique(codes[chosen[codes % self.n]] // self.n).tolist()
            if idxs:
                direction = "out" if self.dg.is_out_channel_pruning_fn(handler) else "in"
                out.append((node.module, direction, idxs))
        return out


def prune_module(module: nn.Module, direction: str, idxs: Sequence[int],
                 scale_norm_classes: Iterable[type] = (), layout=None) -> None:
    """Prune `idxs` of one module's output ('out') or input ('in') channels in place;
    `layout`: the module's registered `WeightLayout`, if any."""
    pruner = registered_pruner(module)
    if pruner is None and layout is not None:
        pruner = LayoutPruner(layout)
    elif pruner is None and isinstance(module, tuple(scale_norm_classes)):
        pruner = ScaleNormPruner()
    elif pruner is None and isinstance(module, tp_ops.TORCH_CONV) and module.groups == module.out_channels \
            and module.out_channels > 1:
        pruner = tp_fn.PrunerBox[tp_ops.OPTYPE.DEPTHWISE_CONV]
    elif pruner is None:
        pruner = tp_fn.PrunerBox.get(tp_ops.module2type(module))
    if pruner is None:
        raise TypeError(f"no channel pruner for {type(module).__name__}")
    fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
    fn(module, list(idxs))
