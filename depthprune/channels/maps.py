"""Exact channel maps: torch-pruning's DepGraph with depthprune's layer pruners, and channel
correspondences through concatenations, splits and reshapes read from the autograd nodes of the
trace instead of torch-pruning's shape inference (which loses the piece a consumer takes from a
`chunk`, and divides by zero on a channel shuffle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .. import _tp
from ..layers import class_pruners, registered_pruner, registered_pruners


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
                    out.append(_tp.HybridIndex(idx=dst + h.idx - src, root_idx=h.root_idx))
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


class DependencyGraph(_tp.DependencyGraph):
    """torch-pruning's DependencyGraph with the pruners of `depthprune.layers` and exact channel maps.

    After `build_dependency`:

    - ``width_barriers``: node -> why no channel reaching it can be removed consistently;
    - ``channel_ties``: node -> `Tie` of channels that go together;
    - ``index_mapped``: nodes through which channel indices are renumbered or tied.

    Concatenation, split and reshape nodes are taken over from torch-pruning's shape inference
    (their node type becomes element-wise, so its heuristics skip them) and get exact maps.
    """

    def __init__(self):
        super().__init__(registered_pruners())
        self.width_barriers: dict = {}
        self.channel_ties: dict = {}
        self.index_mapped: set = set()
        self._taken_over: dict = {}

    def get_pruner_of_module(self, module):
        return registered_pruner(module) or super().get_pruner_of_module(module)

    def before_index_mapping(self, nodes: list) -> None:
        # Runs before torch-pruning's shape inference and index mapping: hide the nodes whose
        # channel maps are computed here.
        for node in nodes:
            if node.type in (_tp.OPTYPE.CONCAT, _tp.OPTYPE.SPLIT, _tp.OPTYPE.RESHAPE):
                self._taken_over[node] = node.type
                node.type = _tp.OPTYPE.ELEMENTWISE

    def build_dependency(self, *args, **kwargs) -> "DependencyGraph":
        super().build_dependency(*args, **kwargs)
        self._exact_channel_maps()
        return self

    def width(self, module: nn.Module, direction: str) -> int | None:
        """`module`'s channel count on side ``direction`` ('out' or 'in')."""
        return self.get_out_channels(module) if direction == "out" else self.get_in_channels(module)

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
            if _tp.is_module_node(n):
                return self.get_out_channels(n) if upstream else self.get_in_channels(n)
            if n.type == _tp.OPTYPE.ELEMENTWISE and n not in self._taken_over:
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
            elif node.type in (_tp.OPTYPE.SLICE, _tp.OPTYPE.UNBIND):
                meta = _meta_shape(node.grad_fn.next_functions[0][0], node.grad_fn.next_functions[0][1]) \
                    if node.grad_fn.next_functions else None
                dim = _saved_dim(node.grad_fn)
                if meta is None or dim is None or dim % len(meta) == self.channel_dim(len(meta)):
                    self.width_barriers[node] = "a slice of the channel dimension with fixed bounds"
        for node, kind in self._taken_over.items():
            if kind == _tp.OPTYPE.RESHAPE:
                how, arg = self._reshape_map(node)
                if how == "barrier":
                    self.width_barriers[node] = arg
                elif how in ("flatten", "unflatten"):
                    self.index_mapped.add(node)
                    wide = _tp.FlattenIndexMapping
                    for src in node.inputs:
                        self._set_map(src, node, wide(arg, reverse=how == "unflatten"),
                                      wide(arg, reverse=how == "flatten"))
            elif kind == _tp.OPTYPE.SPLIT:
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
                    if self._taken_over.get(dst) == _tp.OPTYPE.CONCAT and self._cat_operands(dst) is not None:
                        continue  # set from the concatenation's side
                    nrs = [nr for f, nr in (dst.grad_fn.next_functions or ()) if f is node.grad_fn]
                    if not nrs:
                        self.width_barriers[node] = "a split whose consumers could not be matched to its pieces"
                        continue
                    runs = [(pieces[nr][0], 0, pieces[nr][1]) for nr in nrs]
                    self._set_map(node, dst, _Runs(runs), _Runs(runs, reverse=True))
            elif kind == _tp.OPTYPE.CONCAT:
                operands = self._cat_operands(node)
                if operands is None:
                    continue
                self.index_mapped.add(node)
                for src in set(node.inputs):
                    pieces = self._split_pieces(src) if self._taken_over.get(src) == _tp.OPTYPE.SPLIT else None
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


def trace_channels(model: nn.Module, example_inputs: Any, forward_fn: Callable | None,
                   ignored: Sequence[nn.Module] | None = None) -> DependencyGraph:
    """Trace `model` into a `DependencyGraph` with exact channel maps: the layers of registered
    types with their own pruners and the norms torch-pruning does not know are single nodes
    (`depthprune.layers.class_pruners`); ``ignored`` layers are not traced as layers (default:
    `not_tensor_layers`, found here with ``forward_fn``)."""
    if ignored is None:
        ignored = not_tensor_layers(model, example_inputs, forward_fn) if forward_fn is not None else []
    return _tp.build_dependency_graph(DependencyGraph(), model, example_inputs, forward_fn,
                                      class_pruners(model), ignored)
