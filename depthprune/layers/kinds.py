"""What kind of node a module or a torch function is: the vocabulary of the graph.

Kinds (the paper's partition plus what a real trace holds):

- ``transform``  T: Linear, Conv
- ``activation`` A: element-wise non-linearities
- ``norm``       N: BatchNorm, LayerNorm, GroupNorm, RMSNorm of any library
- ``arith``      M: add, sub, mul of two traced tensors
- ``concat``     M: torch.cat
- ``attention``  one opaque unit per attention operation (q/k/v/o live inside it)
- ``embedding``, ``other`` (reshape, pooling, ...), ``output``

The kinds of module classes are registered in `depthprune.layers.registry`; the kinds of torch
functions are the tables here (`register_activation` adds to the activations).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

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


def register_activation(func: Callable) -> None:
    """Treat calls of `func` (a torch function or Tensor method) as activation nodes."""
    ACTIVATION_FUNCS.add(func)


def op_name(func: Callable) -> str:
    """Stable readable name of a torch function: `__radd__` -> `add`, `relu_` -> `relu`."""
    name = getattr(func, "__name__", None) or type(func).__name__
    name = name.strip("_")
    for prefix in ("r", "i"):
        if name.startswith(prefix) and name[1:] in ("add", "mul", "sub", "matmul", "truediv"):
            name = name[1:]
    return name
