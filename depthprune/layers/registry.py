"""The registry of layer types: everything depthprune knows of a layer type, in one registration.

A `LayerType` says, for the modules it matches (instances of ``cls``, a class or a
``"module:Class"`` name resolved once that module is imported, narrowed by ``match``):

- ``kind``: what node the module is in the graph (`depthprune.layers.kinds`: ``transform``,
  ``norm``, ``attention``, ``embedding``); a transform is a pruning unit, and when it is pruned it
  becomes an identity (`depthprune.depth.identity`), a norm an identity, an attention a
  stand-in keeping its call's output structure;
- ``layout``: where a transform torch-pruning does not know keeps its channels (`WeightLayout`);
  it gives the two following by default, and a `LayoutPruner`;
- ``widths``: ``widths(module) -> (in, out)`` channels (`transform_widths`);
- ``channel_dim``: ``channel_dim(module, direction, name)``, the dimension of parameter ``name``
  (weight, bias) that pruning ``direction`` (in/out) channels cuts (`channel_dim`);
- ``pruner``: the width pruner, a torch-pruning ``BasePruningFunc`` (`width_pruner`,
  `prune_channels`). Registered with a class alone, its instances are single DepGraph nodes.

A registration may leave any of these out: each one of a module comes from the newest
registration matching it that gives it (a later registration overrides a built-in one;
registering the same ``cls`` and ``match`` again replaces the earlier registration).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .. import _tp
from .kinds import ATTENTION, EMBEDDING, NORM, TRANSFORM
from .layouts import FOREIGN_LAYOUTS, WeightLayout
from .pruners import GroupedConvPruner, LayoutPruner, ScaleNormPruner, is_grouped_conv

#: the kinds a module class can have (activations are found from the functions a call runs)
LAYER_KINDS = (TRANSFORM, NORM, ATTENTION, EMBEDDING)
Widths = Callable[[nn.Module], "tuple[int, int]"]
ChannelDim = Callable[[nn.Module, str, str], "int | None"]


def _class_named(name: str) -> type | None:
    """The class ``"module:Class"`` names, None while that module is not imported."""
    module, _, attr = name.partition(":")
    found = getattr(sys.modules.get(module), attr, None)
    return found if isinstance(found, type) else None


@dataclass(frozen=True, eq=False)
class LayerType:
    """One registered layer type (see the module docstring)."""

    cls: type | str | None
    kind: str | None = None
    layout: WeightLayout | None = None
    pruner: _tp.BasePruningFunc | None = None
    widths: Widths | None = None
    channel_dim: ChannelDim | None = None
    match: Callable[[nn.Module], bool] | None = None

    def matches(self, module: nn.Module) -> bool:
        """Instances of ``cls`` (with a ``layout``, of that very class: a subclass may keep its
        weight otherwise) for which ``match`` holds."""
        if self.cls is not None:
            cls = _class_named(self.cls) if isinstance(self.cls, str) else self.cls
            if cls is None or not (type(module) is cls if self.layout is not None else isinstance(module, cls)):
                return False
        return self.match is None or bool(self.match(module))


_TYPES: list[LayerType] = []


def _layout_widths(layout: WeightLayout) -> Widths:
    return lambda m: (m.weight.shape[layout.in_dim], m.weight.shape[layout.out_dim])


def _layout_channel_dim(layout: WeightLayout) -> ChannelDim:
    def dim(m: nn.Module, direction: str, name: str) -> int | None:
        if name == "weight":
            return layout.in_dim if direction == "in" else layout.out_dim
        return 0 if direction == "out" else None
    return dim


def register_layer(cls: type | str | None = None, kind: str | None = None, *, layout: WeightLayout | None = None,
                   pruner: _tp.BasePruningFunc | None = None, widths: Widths | None = None,
                   channel_dim: ChannelDim | None = None, match: Callable[[nn.Module], bool] | None = None
                   ) -> LayerType:
    """Register a layer type: instances of ``cls`` (a class, or ``"module:Class"`` for a class of
    another library, never imported here) for which ``match`` holds (either may be None, not
    both). A ``layout`` makes it a transform by default and gives its widths, channel dimensions
    and a `LayoutPruner` unless they are given."""
    if cls is None and match is None:
        raise ValueError("register_layer needs a class, a match, or both")
    if layout is not None:
        kind = kind or TRANSFORM
        pruner = pruner or LayoutPruner(layout)
        widths = widths or _layout_widths(layout)
        channel_dim = channel_dim or _layout_channel_dim(layout)
    if kind is not None and kind not in LAYER_KINDS:
        raise ValueError(f"a layer type's kind is one of {', '.join(LAYER_KINDS)}, not {kind!r}")
    entry = LayerType(cls, kind, layout, pruner, widths, channel_dim, match)
    for i, old in enumerate(_TYPES):
        if old.cls is cls or (isinstance(cls, str) and old.cls == cls):
            if old.match is match:
                _TYPES[i] = entry
                return entry
    _TYPES.append(entry)
    return entry


def unregister_layer(entry: LayerType) -> None:
    """Remove a registration (`register_layer`'s return value)."""
    _TYPES[:] = [t for t in _TYPES if t is not entry]


def layer_types(module: nn.Module) -> list[LayerType]:
    """The registrations matching `module`, newest first."""
    if not isinstance(module, nn.Module):
        return []
    return [t for t in reversed(_TYPES) if t.matches(module)]


def _newest(module: nn.Module, aspect: str):
    if isinstance(module, nn.Module):
        for t in reversed(_TYPES):
            if getattr(t, aspect) is not None and t.matches(module):
                return t
    return None


def layer_type(module: nn.Module) -> LayerType | None:
    """The registration that gives `module` its kind (None: an unregistered module, ``other``)."""
    return _newest(module, "kind")


def module_kind(module: nn.Module) -> str | None:
    t = layer_type(module)
    return None if t is None else t.kind


# ------------------------------------------------------------------------------ shorthands
def register_norm(cls: type | str) -> LayerType:
    """Treat instances of `cls` as norm nodes (and prune their per-channel weight)."""
    return register_layer(cls, NORM)


def register_transform(cls: type | str, layout: WeightLayout) -> LayerType:
    """Treat instances of `cls` (a class or ``"module:Class"``) as transform nodes whose
    channels sit in the weight as `layout` says; width pruning, widths and parameter counts follow."""
    return register_layer(cls, TRANSFORM, layout=layout)


def register_attention(cls: type | str) -> LayerType:
    """Treat instances of `cls` as one opaque attention unit."""
    return register_layer(cls, ATTENTION)


def register_layer_pruner(match: Callable[[nn.Module], bool], pruner: _tp.BasePruningFunc) -> LayerType:
    """Prune every module for which ``match(module)`` holds with ``pruner`` (in DepGraph and in
    `prune_channels`), whatever its kind."""
    return register_layer(None, pruner=pruner, match=match)


# ------------------------------------------------------------------------------ questions
#: Class-name suffixes that mark a norm from another library (FooRMSNorm, BarLayerNorm, ...).
NORM_NAME_SUFFIXES: list[str] = ["RMSNorm", "LayerNorm"]


def is_transform_module(m: nn.Module) -> bool:
    return module_kind(m) == TRANSFORM


def is_norm_module(m: nn.Module) -> bool:
    return module_kind(m) == NORM


def is_attention_module(m: nn.Module) -> bool:
    return module_kind(m) == ATTENTION


def is_embedding_module(m: nn.Module) -> bool:
    return module_kind(m) == EMBEDDING


def transform_layout(m: nn.Module) -> WeightLayout | None:
    """The registered weight layout of `m`'s class, or None (torch-pruning's own layers)."""
    t = _newest(m, "layout")
    return None if t is None else t.layout


def transform_widths(m: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a transform; (0, 0) for any other module."""
    t = _newest(m, "widths")
    return (0, 0) if t is None else tuple(t.widths(m))


def channel_dim(m: nn.Module, direction: str, name: str) -> int | None:
    """The dimension of parameter ``name`` (weight or bias) of `m` that pruning its ``direction``
    (``in``/``out``) channels cuts; None when that parameter is untouched (default: dim 0)."""
    t = _newest(m, "channel_dim")
    return 0 if t is None else t.channel_dim(m, direction, name)


def affine_widths(m: nn.Module) -> tuple[int, int] | None:
    """(input, output) widths of a transform that maps its input's last dimension by a 2-D
    weight (``nn.Linear``, or a registered layout such as Hugging Face's transposed ``Conv1D``),
    else None: the layers compensation refits and sparsification masks."""
    w = getattr(m, "weight", None)
    if not (is_transform_module(m) and isinstance(w, torch.Tensor) and w.dim() == 2):
        return None
    if {channel_dim(m, "in", "weight"), channel_dim(m, "out", "weight")} != {0, 1}:
        return None
    return transform_widths(m)


def affine_transposed(m: nn.Module) -> bool:
    """An `affine_widths` layer keeps its weight as ``[in, out]``."""
    return channel_dim(m, "out", "weight") != 0


def affine_weight(m: nn.Module) -> torch.Tensor:
    """The weight of an `affine_widths` layer as ``[out, in]``."""
    return m.weight.T if affine_transposed(m) else m.weight


def _per_channel_norm(m: nn.Module) -> bool:
    """A norm torch-pruning has no pruner for, with one per-channel weight or none at all."""
    w = getattr(m, "weight", None)
    return (is_norm_module(m) and not isinstance(m, _tp.TP_NORMS)
            and (w is None or (isinstance(w, torch.Tensor) and w.dim() == 1)))


def is_foreign_norm(m: nn.Module) -> bool:
    """A norm torch-pruning has no pruner for: it gets depthprune's per-channel pruner."""
    return _per_channel_norm(m) and getattr(m, "weight", None) is not None


# ------------------------------------------------------------------------------ width pruning
SCALE_NORM_PRUNER = ScaleNormPruner()


def registered_pruner(module: nn.Module) -> _tp.BasePruningFunc | None:
    """The pruner a registration gives `module` (None: none does)."""
    t = _newest(module, "pruner")
    return None if t is None else t.pruner


def registered_pruners() -> list[_tp.BasePruningFunc]:
    return [t.pruner for t in _TYPES if t.pruner is not None]


def width_pruner(module: nn.Module) -> _tp.BasePruningFunc | None:
    """depthprune's pruner of `module` (None: torch-pruning's own applies): a registered one, else
    the per-channel pruner of a norm torch-pruning does not know (a no-op on one without weight)."""
    pruner = registered_pruner(module)
    if pruner is None and _per_channel_norm(module):
        pruner = SCALE_NORM_PRUNER
    return pruner


def class_pruners(model: nn.Module) -> dict[type, _tp.BasePruningFunc]:
    """``{class: pruner}`` of the layers of `model` that DepGraph traces as one node each: norms
    torch-pruning does not know, and layer types registered with a class and a pruner (and no
    ``match``), e.g. a weight layout."""
    norms = sorted({type(m) for m in model.modules() if is_foreign_norm(m)}, key=lambda c: c.__qualname__)
    out: dict[type, _tp.BasePruningFunc] = {cls: SCALE_NORM_PRUNER for cls in norms}
    for m in model.modules():
        t = _newest(m, "pruner")
        if t is not None and t.cls is not None and t.match is None:
            out[type(m)] = t.pruner
    return out


def prune_channels(module: nn.Module, direction: str, idxs: Sequence[int]) -> None:
    """Prune `idxs` of one module's output ('out') or input ('in') channels in place."""
    pruner = width_pruner(module) or _tp.default_pruner(module)
    if pruner is None:
        raise TypeError(f"no channel pruner for {type(module).__name__}")
    fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
    fn(module, list(idxs))


# ------------------------------------------------------------------------------ built-in types
def _linear_channel_dim(m: nn.Module, direction: str, name: str) -> int | None:
    if direction == "out":
        return 0
    return 1 if name == "weight" else None


def _conv_channel_dim(m: nn.Module, direction: str, name: str) -> int | None:
    # grouped and depthwise convs lose whole rows: their input and output channels go together
    if direction == "out" or m.groups > 1:
        return 0
    return 1 if name == "weight" else None


def _builtins(entries: Iterable[tuple]) -> None:
    for args, kw in entries:
        register_layer(*args, **kw)


# Oldest first: where two built-in kinds match one module, transform wins over norm, norm over
# embedding, embedding over attention.
_builtins([
    ((nn.MultiheadAttention, ATTENTION), {}),
    ((nn.Embedding, EMBEDDING), {"channel_dim": lambda m, direction, name: 1 if name == "weight" else None}),
    *(((cls, NORM), {}) for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm)),
    ((None, NORM), {"match": lambda m: type(m).__name__.endswith(tuple(NORM_NAME_SUFFIXES))}),
    # every convolution (transposed ones too) has its widths and channel dims; the plain ones are transforms
    ((nn.modules.conv._ConvNd,), {"widths": lambda m: (m.in_channels, m.out_channels),
                                  "channel_dim": _conv_channel_dim}),
    ((nn.Linear, TRANSFORM), {"widths": lambda m: (m.in_features, m.out_features),
                              "channel_dim": _linear_channel_dim}),
    *(((cls, TRANSFORM), {}) for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    *(((name, TRANSFORM), {"layout": layout}) for name, layout in FOREIGN_LAYOUTS.items()),
    # grouped convolutions: whole groups only (torch-pruning leaves `groups` alone)
    ((None,), {"pruner": GroupedConvPruner(), "match": is_grouped_conv}),
])
