"""What kind of node a module or a torch function is: a registry users can extend.

Kinds (the paper's partition plus what a real trace holds):

- ``transform``  T: Linear, Conv
- ``activation`` A: element-wise non-linearities
- ``norm``       N: BatchNorm, LayerNorm, GroupNorm, RMSNorm of any library
- ``arith``      M: add, sub, mul of two traced tensors
- ``concat``     M: torch.cat
- ``attention``  one opaque unit per attention operation (q/k/v/o live inside it)
- ``embedding``, ``other`` (reshape, pooling, ...), ``output``
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.layouts import FOREIGN_LAYOUTS, WeightLayout

TRANSFORM, ACTIVATION, NORM, ARITH, CONCAT = "transform", "activation", "norm", "arith", "concat"
ATTENTION, EMBEDDING, OTHER, OUTPUT = "attention", "embedding", "other", "output"
#: a mixture of experts whose expert weights are stacked in tensors (one matrix per expert): one
#: unit, collapsed like an attention operation
EXPERTS = "experts"
KINDS = (TRANSFORM, ACTIVATION, NORM, ARITH, CONCAT, ATTENTION, EXPERTS, EMBEDDING, OTHER, OUTPUT)
#: units pruned whole by collapse (their inner transforms are no units)
COLLAPSED = (ATTENTION, EXPERTS)
#: node kinds that are pruning units (the triggers of Prune(f)); bounded searches stop at them
UNIT_KINDS = (TRANSFORM, *COLLAPSED)

TRANSFORM_CLASSES: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d]


#: Transforms registered with their weight layout (one entry per layer type); each is a
#: transform node, gets a channel pruner in DepGraph and is counted like a Linear.
TRANSFORM_LAYOUTS: dict[type, WeightLayout] = {}
#: Layouts of layer types named by ``"module:Class"``, resolved when that module has been
#: imported (never importing it): a model holding such a layer has imported its class.
_LAZY_LAYOUTS: dict[str, WeightLayout] = dict(FOREIGN_LAYOUTS)
NORM_CLASSES: list[type] = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
                            nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                            nn.InstanceNorm3d, nn.RMSNorm]
#: Class-name suffixes that mark a norm from another library (FooRMSNorm, BarLayerNorm, ...).
NORM_NAME_SUFFIXES: list[str] = ["RMSNorm", "LayerNorm"]
ATTENTION_CLASSES: list[type] = [nn.MultiheadAttention]
EMBEDDING_CLASSES: list[type] = [nn.Embedding]

_ACTIVATION_FUNCS = ["relu", "relu_", "relu6", "silu", "gelu", "sigmoid", "tanh", "hardswish",
                     "hardsigmoid", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
                     "mish", "softplus", "hardtanh", "hardtanh_", "silu_", "sigmoid_", "tanh_"]
ACTIVATION_FUNCS: set[Callable] = set()
for _name in _ACTIVATION_FUNCS:
    for _ns in (F, torch, torch.Tensor):
        if hasattr(_ns, _name):
            ACTIVATION_FUNCS.add(getattr(_ns, _name))

ARITH_FUNCS: set[Callable] = {getattr(torch.Tensor, n) for n in (
    "__add__", "__radd__", "__iadd__", "add", "add_", "__mul__", "__rmul__", "__imul__",
    "mul", "mul_", "__sub__", "__rsub__", "__isub__", "sub", "sub_")} | {torch.add, torch.mul, torch.sub}
CONCAT_FUNCS: set[Callable] = {torch.cat, torch.concat, torch.concatenate}
ATTENTION_KERNELS: set[Callable] = {F.scaled_dot_product_attention}
SOFTMAX_FUNCS: set[Callable] = {F.softmax, torch.softmax, torch.Tensor.softmax}
MATMUL_FUNCS: set[Callable] = {torch.matmul, torch.bmm, torch.einsum, torch.Tensor.__matmul__,
                               torch.Tensor.matmul, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm,
                               torch.addbmm, torch.Tensor.addbmm}


def register_norm(cls: type) -> None:
    """Treat instances of `cls` as norm nodes (and prune their per-channel weight)."""
    if cls not in NORM_CLASSES:
        NORM_CLASSES.append(cls)


def register_transform(cls: type | str, layout: WeightLayout) -> None:
    """Treat instances of `cls` (a class or ``"module:Class"``) as transform nodes whose
    channels sit in the weight as `layout` says; width pruning, widths and parameter counts follow."""
    if isinstance(cls, str):
        _LAZY_LAYOUTS[cls] = layout
    else:
        TRANSFORM_LAYOUTS[cls] = layout


def transform_layout(m: nn.Module) -> WeightLayout | None:
    """The registered weight layout of `m`'s class, or None (torch-pruning's own layers)."""
    for name in list(_LAZY_LAYOUTS):
        module, _, cls_name = name.partition(":")
        cls = getattr(sys.modules.get(module), cls_name, None)
        if isinstance(cls, type):
            TRANSFORM_LAYOUTS[cls] = _LAZY_LAYOUTS.pop(name)
    return TRANSFORM_LAYOUTS.get(type(m))


def register_activation(func: Callable) -> None:
    """Treat calls of `func` (a torch function or Tensor method) as activation nodes."""
    ACTIVATION_FUNCS.add(func)


def register_attention(cls: type) -> None:
    """Treat instances of `cls` as one opaque attention unit."""
    if cls not in ATTENTION_CLASSES:
        ATTENTION_CLASSES.append(cls)


def is_norm_module(m: nn.Module) -> bool:
    return isinstance(m, tuple(NORM_CLASSES)) or any(
        type(m).__name__.endswith(s) for s in NORM_NAME_SUFFIXES)


def is_transform_module(m: nn.Module) -> bool:
    return isinstance(m, tuple(TRANSFORM_CLASSES)) or transform_layout(m) is not None


def transform_widths(m: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a transform; (0, 0) for any other module."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    layout = transform_layout(m)
    if layout is not None:
        return m.weight.shape[layout.in_dim], m.weight.shape[layout.out_dim]
    return 0, 0


def affine_widths(m: nn.Module) -> tuple[int, int] | None:
    """(input, output) widths of a transform that maps its input's last dimension by a 2-D
    weight (``nn.Linear``, or a registered layout such as Hugging Face's transposed ``Conv1D``),
    else None: the layers compensation refits and sparsification masks."""
    if isinstance(m, nn.Linear) or (transform_layout(m) is not None and getattr(m, "weight", None) is not None
                                    and m.weight.dim() == 2):
        return transform_widths(m)
    return None


def affine_transposed(m: nn.Module) -> bool:
    """An `affine_widths` layer keeps its weight as ``[in, out]``."""
    return not isinstance(m, nn.Linear) and transform_layout(m).out_dim != 0


def affine_weight(m: nn.Module) -> torch.Tensor:
    """The weight of an `affine_widths` layer as ``[out, in]``."""
    return m.weight.T if affine_transposed(m) else m.weight


def channel_dim(m: nn.Module, direction: str, name: str) -> int | None:
    """The dimension of parameter ``name`` (weight or bias) of `m` that pruning its ``direction``
    (``in``/``out``) channels cuts; None when that parameter is untouched."""
    if isinstance(m, nn.Embedding):
        return 1 if name == "weight" else None
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        # grouped and depthwise convs lose whole rows: their input and output channels go together
        grouped = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
        if direction == "out" or grouped:
            return 0
        return 1 if name == "weight" else None
    layout = transform_layout(m)
    if layout is not None:
        if name == "weight":
            return layout.in_dim if direction == "in" else layout.out_dim
        return 0 if direction == "out" else None
    return 0


def is_foreign_norm(m: nn.Module) -> bool:
    """A norm torch-pruning has no pruner for: it gets depthprune's per-channel pruner."""
    known = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
             nn.modules.instancenorm._InstanceNorm)
    w = getattr(m, "weight", None)
    return (is_norm_module(m) and not isinstance(m, known)
            and isinstance(w, torch.Tensor) and w.dim() == 1)


def op_name(func: Callable) -> str:
    """Stable readable name of a torch function: `__radd__` -> `add`, `relu_` -> `relu`."""
    name = getattr(func, "__name__", None) or type(func).__name__
    name = name.strip("_")
    for prefix in ("r", "i"):
        if name.startswith(prefix) and name[1:] in ("add", "mul", "sub", "matmul", "truediv"):
            name = name[1:]
    return name
