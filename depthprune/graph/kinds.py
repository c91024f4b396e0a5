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

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

TRANSFORM, ACTIVATION, NORM, ARITH, CONCAT = "transform", "activation", "norm", "arith", "concat"
ATTENTION, EMBEDDING, OTHER, OUTPUT = "attention", "embedding", "other", "output"
KINDS = (TRANSFORM, ACTIVATION, NORM, ARITH, CONCAT, ATTENTION, EMBEDDING, OTHER, OUTPUT)

TRANSFORM_CLASSES: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d]
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
                               torch.Tensor.matmul, torch.Tensor.bmm}


def register_norm(cls: type) -> None:
    """Treat instances of `cls` as norm nodes (and prune their per-channel weight)."""
    if cls not in NORM_CLASSES:
        NORM_CLASSES.append(cls)


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
    return isinstance(m, tuple(TRANSFORM_CLASSES))


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
