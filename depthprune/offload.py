"""Models whose weights accelerate keeps off the compute device (``device_map`` offload,
`accelerate.cpu_offload`, `accelerate.disk_offload`).

Under accelerate's offload hooks a module's parameters are on the meta device except while
its own forward runs; reading or width-pruning them (what a scoring trial does) would act on
meta tensors. `resident` makes one block's weights real for the duration of a ``with`` block,
through accelerate's own loader (``hook.weights_map``) and hooks, and offloads them again after,
so that pruning a large model needs memory for its streamed forwards plus one resident block.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from .errors import UserError


def _offloading_hooks(hook) -> list:
    """The accelerate ``AlignDevicesHook``s in ``hook`` (one, a ``SequentialHook`` or None) that
    offload their module's weights."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]


def _offloaded_tensors(m: nn.Module, h) -> list[tuple[str, object]]:
    """(name, tensor) of every tensor of ``m`` that the offloading hook ``h`` manages."""
    from accelerate.utils import named_module_tensors
    return list(named_module_tensors(m, include_buffers=h.offload_buffers, recurse=h.place_submodules,
                                     remove_non_persistent=True))


def offloaded_modules(module: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, hook) for every submodule of ``module`` whose weights an accelerate hook offloads."""
    try:
        import accelerate.hooks  # noqa: F401
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return []
    return [(m, m._hf_hook) for m in module.modules() if _offloading_hooks(getattr(m, "_hf_hook", None))]


def refuse_offloaded(module: nn.Module, what: str = "pruning") -> None:
    """`UserError` when accelerate offloads some of ``module``'s weights: width changes and refits
    would act on the placeholders the hooks keep (tests/test_offload_prune.py says what is missing)."""
    held = offloaded_modules(module)
    if held:
        raise UserError(f"{what} a model whose weights accelerate offloads ({len(held)} modules, to the CPU or disk) is "
                        "not supported yet; load it where it fits whole (--device cpu, or enough GPU memory)")


@contextmanager
def resident(module: nn.Module, keep: bool = False):
    """Inside the ``with`` block ``module``'s offloaded weights are real tensors on the hooks'
    execution device and plain (no hook moves them); after it they are offloaded again.
    Without ``keep``, changes made inside (a trial's width pruning) must be undone before it
    ends: the offloaded copy is what comes back. With ``keep`` (sparsification), every tensor
    of the held modules as it is at the end, new ones included (an added bias), becomes the
    offloaded copy (`store_offloaded`). Nothing happens for a module without offload hooks."""
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device
    held = offloaded_modules(module)
    for m, hook in held:
        for h in _offloading_hooks(hook):
            for name, _ in _offloaded_tensors(m, h):
                set_module_tensor_to_device(m, name, h.execution_device, value=h.weights_map[name])
            h.original_devices = {}  # detaching must not load them a second time
        remove_hook_from_module(m)
    try:
        yield module
        if keep:
            for m, hook in held:
                for h in _offloading_hooks(hook):
                    for name, t in _offloaded_tensors(m, h):
                        store_offloaded(h.weights_map, name, t)
    finally:
        for m, hook in held:
            add_hook_to_module(m, hook)  # the hook's init offloads the weights again (meta)


def store_offloaded(weights_map, name: str, tensor) -> None:
    """Make ``tensor`` the offloaded copy of ``name`` in an accelerate hook's ``weights_map``: a
    disk store gets a new ``.dat`` file in its own offload folder (its in-memory index updated, as
    `accelerate.utils.offload_weight` does), a store without a folder or a plain dict (cpu offload)
    holds it in CPU memory. Files the store reads from elsewhere (a model's safetensors) are never
    written."""
    from accelerate.utils import offload_weight
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset
    base, key = weights_map, name
    while isinstance(base, PrefixedDataset):
        base, key = base.dataset, base.prefix + key
    value = tensor.detach().to("cpu")
    if isinstance(base, OffloadedWeightsLoader):
        if base.save_folder is not None and key not in base.state_dict:
            offload_weight(value, key, base.save_folder, index=base.index)
        else:
            base.state_dict[key] = value
        if key not in base.all_keys:
            base.all_keys.append(key)
    else:
        base[key] = value


@contextmanager
def lean_trace(model: nn.Module):
    """Around a dependency-graph trace of a model with offloaded weights: the trace keeps no
    weight alive, so it needs one layer's weights at a time, like any offloaded forward.

    A DepGraph trace keeps the autograd graph of its forward, and under accelerate's hooks that
    graph would hold every layer's loaded weights twice over: as tensors saved for backward and
    as the ``variable`` of each weight's ``AccumulateGrad`` node. Inside this context no tensor is
    saved for backward (the trace reads the graph's structure and saved sizes, never runs it),
    and an offloaded module whose input already carries a gradient runs with its parameters not
    requiring one (its output still has a ``grad_fn``, so its node is traced; modules the graph
    starts at keep theirs). Nothing changes for a model without offload hooks."""
    import torch
    from torch.utils._pytree import tree_flatten
    held = offloaded_modules(model)
    if not held:
        yield
        return
    flags: dict[tuple[nn.Module, str], bool] = {}

    def pre(module, args, kwargs):
        leaves = tree_flatten((args, kwargs))[0]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            for name, p in module.named_parameters():
                flags.setdefault((module, name), p.requires_grad)
                p.requires_grad_(False)

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True, prepend=True) for m, _ in held]
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
            yield
    finally:
        for h in handles:
            h.remove()
        for (m, name), flag in flags.items():
            m.get_parameter(name).requires_grad_(flag)  # the hooks replaced the Parameter objects
