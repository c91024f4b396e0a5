"""Recording who computed what during one forward pass.

A `TorchFunctionMode` sees every torch function call and global module hooks keep a stack of
module *call paths* (parent path + attribute name, so one module instance shared by several
parents, such as one activation module reused by every conv block, gets one path per call site). Each autograd node
created in the pass is attributed to the call that created it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..layers import kinds


@dataclass
class OpRecord:
    func: Callable
    name: str            # readable op name, e.g. "add"
    call: str            # call path of the innermost module call, "" for the root
    stack: tuple         # call paths of every enclosing module call, outermost first
    index: int           # how many `name` ops the same module call made before this one
    n_graph_inputs: int  # tensor arguments that carry a grad_fn
    cat: tuple | None = None  # concatenations: (dim, ndim) of the result, dim made non-negative
    split: tuple | None = None  # one tensor cut into parts: (dim, ndim, part sizes), dim non-negative


@dataclass
class CallRecord:
    path: str
    module: nn.Module
    stack: tuple
    in_shape: tuple | None = None
    out_shape: tuple | None = None
    hidden_arg: Any = None   # ("arg", i) or ("kwarg", name): the input shaped like the output
    flat_arg: Any = None  # else the input holding the output's values with its tokens flattened
    adds_input: bool = False  # its output is an addition with one of its inputs (a residual block)
    out_structure: Any = None  # "tensor" or ("tuple", n, i): where the primary output sits
    n_ops: int = 0
    attention_kernel: bool = False
    saw_matmul: bool = False
    activation: str | None = None  # name of the first activation function the call itself ran


def natural_key(name: str) -> list:
    """Sort key for node and module names: digit runs compare as numbers (layers.2 < layers.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_path(call_path: str) -> str:
    """The module a call path names: its call counts dropped (``layer.0@2.ffn`` is the third call
    of ``layer.0``, a shared layer, reaching ``layer.0.ffn``; ``@1.model`` the root's second)."""
    return ".".join(p for p in (seg.split("@")[0] for seg in call_path.split(".")) if p)


def traceable_output(out: Any) -> Any:
    """A forward's output as DepGraph can read it: unchanged when every leaf is a tensor (or
    None), else the list of its tensors (a cache object or a Python value is not traced)."""
    leaves = tree_flatten(out)[0]
    if any(leaf is not None and not isinstance(leaf, torch.Tensor) for leaf in leaves):
        return [t for t in leaves if isinstance(t, torch.Tensor)]
    return out


def _split_of(args, out) -> tuple | None:
    """(dim, ndim, sizes) when ``out`` is the parts of the first argument cut along one dim
    (chunk, split, tensor_split, unbind excluded: its parts lose the dim)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(out, (tuple, list)) or len(out) < 2:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == x.dim() for t in out):
        return None
    dims = {d for t in out for d in range(x.dim()) if t.shape[d] != x.shape[d]}
    if len(dims) != 1:
        return None
    (dim,) = dims
    sizes = tuple(int(t.shape[dim]) for t in out)
    return (dim, x.dim(), sizes) if sum(sizes) == x.shape[dim] else None


def _named_inputs(args, kwargs) -> list:
    """``[(("arg", i) or ("kwarg", name), value)]`` of a call's inputs, positional ones first."""
    return [(("arg", i), a) for i, a in enumerate(args)] + [(("kwarg", k), a) for k, a in kwargs.items()]


def _first_tensor(x):
    leaves, _ = tree_flatten(x)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


class Recorder(TorchFunctionMode):
    """Context manager recording op and module-call provenance of one forward pass."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root
        self.child_name: dict[tuple[int, int], str] = {}
        self.canonical: dict[int, str] = {}
        for name, m in root.named_modules(remove_duplicate=False):
            self.canonical.setdefault(id(m), name)
            for cname, child in m.named_children():
                self.child_name.setdefault((id(m), id(child)), cname)
        self.stack: list[CallRecord] = []
        self.calls: list[CallRecord] = []
        self.path_count: dict[str, int] = {}
        self.ops: dict[Any, OpRecord] = {}
        self._op_counts: list[dict[str, int]] = []
        self._handles = []
        self.outputs: list[Any] = []

    # -- module call stack -------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        if self.stack:
            parent = self.stack[-1]
            cname = self.child_name.get((id(parent.module), id(module)))
            base = (f"{parent.path}.{cname}" if parent.path else cname) if cname else \
                self.canonical.get(id(module), type(module).__name__)
        else:
            base = self.canonical.get(id(module), "")
        n = self.path_count.get(base, 0)
        self.path_count[base] = n + 1
        path = base if n == 0 else f"{base}@{n}"
        rec = CallRecord(path=path, module=module, stack=tuple(c.path for c in self.stack) + (path,))
        t = _first_tensor((args, kwargs))
        rec.in_shape = tuple(t.shape) if t is not None else None
        rec._args, rec._kwargs = args, kwargs  # dropped in _post
        self.stack.append(rec)
        self.calls.append(rec)
        self._op_counts.append({})

    def _post(self, module, args, kwargs, output):
        rec = self.stack.pop()
        self._op_counts.pop()
        if isinstance(output, torch.Tensor):
            primary, rec.out_structure = output, "tensor"
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            primary, rec.out_structure = output[0], ("tuple", len(output), 0)
        else:
            primary = _first_tensor(output)
            rec.out_structure = None
        rec.out_shape = tuple(primary.shape) if primary is not None else None
        named = _named_inputs(rec._args, rec._kwargs)
        del rec._args, rec._kwargs
        residual = self._residual_input(primary, named)
        if residual is not None:
            rec.hidden_arg, rec.adds_input = residual, True
        elif primary is not None:
            floats = [(w, a) for w, a in named if isinstance(a, torch.Tensor) and a.is_floating_point()]
            rec.hidden_arg = next((w for w, a in floats if a.shape == primary.shape), None)
            if rec.hidden_arg is None:
                rec.flat_arg = next((w for w, a in floats if a.dim() > primary.dim() and a.numel() == primary.numel()
                                     and a.shape[-1] == primary.shape[-1]), None)

    def _residual_input(self, out, named: list) -> tuple | None:
        """("arg", i) or ("kwarg", name) when the call's output is an addition with that input
        as an operand (the module adds its own residual): what the call returns once its own
        computation is gone."""
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return None
        r = self.ops.get(out.grad_fn)
        if r is None or r.name != "add" or r.func not in kinds.ARITH_FUNCS:
            return None
        operands = {f for f, _ in out.grad_fn.next_functions if f is not None}
        for where, a in named:
            if isinstance(a, torch.Tensor) and a.shape == out.shape and a.grad_fn in operands:
                return where
        return None

    # -- torch functions -----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.stack:
            return out
        top = self.stack[-1]
        if func in kinds.ATTENTION_KERNELS:
            top.attention_kernel = True
        elif func in kinds.MATMUL_FUNCS:
            top.saw_matmul = True
        elif func in kinds.SOFTMAX_FUNCS and top.saw_matmul:
            top.attention_kernel = True
        leaves, _ = tree_flatten(out)
        if func is torch.Tensor.__setitem__ and args and isinstance(args[0], torch.Tensor):
            # ``y[idx] = v`` returns None but gives ``y`` a new autograd node (CopySlices): it is
            # this call's output, else the next op reading ``y`` would claim it (a decoding that
            # assigns slices in place, then concatenates, made the concatenation claim it)
            leaves = [args[0]]
        tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not tensors:
            return out
        n_in = sum(1 for a in tree_flatten((args, kwargs))[0]
                   if isinstance(a, torch.Tensor) and a.grad_fn is not None)
        name = kinds.op_name(func)
        counts = self._op_counts[-1]
        new = False
        record = OpRecord(func, name, top.path, top.stack, counts.get(name, 0), n_in)
        if func in kinds.CONCAT_FUNCS and isinstance(out, torch.Tensor):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            record.cat = (dim % out.dim(), out.dim())
        record.split = _split_of(args, out)
        for t in tensors:
            # Autograd nodes made inside this one call (F.linear makes view/mm/t) are not
            # outputs of any call seen here: walk back to what is already known.
            todo = [t.grad_fn]
            while todo:
                gf = todo.pop()
                if gf is None or gf in self.ops or hasattr(gf, "variable"):
                    continue
                new = True
                self.ops[gf] = record
                todo.extend(f for f, _ in gf.next_functions)
        if new:
            counts[name] = counts.get(name, 0) + 1
            top.n_ops += 1
            if func in kinds.ACTIVATION_FUNCS and top.activation is None:
                top.activation = name
        return out

    def __enter__(self):
        for m in self.root.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return super().__exit__(*exc)

    def wrap_forward(self, forward_fn: Callable) -> Callable:
        """A forward function for DepGraph that also remembers the model outputs."""
        def fwd(model, inputs):
            out = traceable_output(forward_fn(model, inputs))
            self.outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            return out
        return fwd
