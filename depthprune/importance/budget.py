"""What a target counts (``prune --budget``): the cost users pay, measured on the model as it is.

- ``params`` (the default): parameters, tied ones once (`depthprune.depth.count_params`).
- ``flops``: floating-point operations of one forward, as ``torch.utils.flop_counter`` counts them
  (matrix products, convolutions and attention: 2 per multiply-add; element-wise work is not
  counted), on one calibration sample at its own size, per token for a language model (at
  ``--seq-len``: attention grows with it) and per input otherwise (per image for a detector).
- ``kv-cache``: bytes a language model's KV cache holds per token, read from the cache one
  forward really fills (the adapter's ``kv_cache_fn``): attentions pruned away store nothing.
- ``latency``: seconds of one forward of one calibration sample, estimated from the modules
  still there with a `depthprune.importance.latency.LatencyTable` measured on the dense model
  (``depthprune profile``; measured on the spot when none is given).

Each is a `Budget`: ``total(model)`` on the current structure (cached per
`DepthPruner.version`, as nothing but the structure changes it). A schedule's target is then the
fraction of the budget's total removed, and groups are ranked by importance lost per unit of it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..depth.engine import count_params
from ..errors import UserError
from ..graph.build import default_forward
from .latency import LatencyTable, profile_latency

BUDGETS = ("params", "flops", "kv-cache", "latency")


class Budget:
    """The cost a target counts; ``total(model)`` on the current structure (``version``, when
    given, keys a cache: the same structure costs the same)."""

    name = "params"
    unit = "parameters"

    def __init__(self) -> None:
        self._cache: dict[int, float] = {}

    def total(self, model: torch.nn.Module, version: int | None = None) -> float:
        if version is None:
            return self.measure(model)
        if version not in self._cache:
            self._cache[version] = self.measure(model)
        return self._cache[version]

    def measure(self, model: torch.nn.Module) -> float:
        return float(count_params(model))


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel (its inputs' shapes), as torch counts the GPU ones
    (QK^T and AV)."""
    return sdpa_flop_count(*(getattr(t, "shape", t) for t in (query, key, value)))


#: kernels torch's counter leaves out (the CPU flash attention): counted like their GPU kin
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops} \
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else {}


class Flops(Budget):
    """FLOPs of one forward of ``batch`` (one sample) through ``forward_fn``, divided by ``per``
    (its tokens for a language model, 1 otherwise)."""

    name, unit = "flops", "FLOPs"

    def __init__(self, forward_fn: Callable, batch, per: int):
        super().__init__()
        self.forward_fn, self.batch, self.per = forward_fn, batch, per

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> float:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
            self.forward_fn(model, self.batch)
        return counter.get_total_flops() / self.per


class KVCache(Budget):
    """KV-cache bytes per token (``kv_cache_fn(model)``, the adapter's)."""

    name, unit = "kv-cache", "bytes per token"

    def __init__(self, kv_cache_fn: Callable):
        super().__init__()
        self.kv_cache_fn = kv_cache_fn

    def measure(self, model: torch.nn.Module) -> float:
        return float(self.kv_cache_fn(model))


class Latency(Budget):
    """Seconds of one forward, estimated by a `LatencyTable` of the dense model."""

    name, unit = "latency", "seconds"

    def __init__(self, table: LatencyTable):
        super().__init__()
        self.table = table

    def measure(self, model: torch.nn.Module) -> float:
        return self.table.estimate(model)


def one_sample(batch):
    """The first sample of a calibration batch (a tensor, or a tuple/list/dict of tensors with
    the batch first)."""
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, (tuple, list)):
        return type(batch)(one_sample(b) for b in batch)
    if isinstance(batch, dict):
        return {k: one_sample(v) for k, v in batch.items()}
    return batch


def make_budget(name: str, lm, batches: list, latency_table: LatencyTable | None = None) -> Budget:
    """The `Budget` called ``name`` for ``lm`` (a `depthprune.adapters.LoadedModel`), FLOPs
    measured on the first sample of ``batches``; latency estimated by ``latency_table`` (checked
    against ``lm.model``), else by a table profiled now on that sample."""
    if name not in BUDGETS:
        raise UserError(f"unknown budget {name!r}; use one of {', '.join(BUDGETS)}")
    if name == "params":
        return Budget()
    if name == "flops":
        sample = one_sample(batches[0])
        first = sample[0] if isinstance(sample, (tuple, list)) else sample
        per = first.shape[1] if lm.logits_fn is not None and isinstance(first, torch.Tensor) and first.dim() > 1 else 1
        return Flops(lm.forward_fn or default_forward, sample, per)
    if name == "kv-cache":
        if lm.kv_cache_fn is None:
            raise UserError(f"--budget kv-cache counts a language model's KV cache; {lm.spec} ({lm.family}) has none")
        return KVCache(lm.kv_cache_fn)
    if latency_table is None:
        latency_table = profile_latency(lm.model, lm.forward_fn, one_sample(batches[0]), progress=False)
    latency_table.check(lm.model)
    return Latency(latency_table)


def costs(lm, batches: list, model=None, latency_table: LatencyTable | None = None) -> dict[str, float | None]:
    """Every budget's total on ``model`` (default ``lm.model``) that applies to ``lm`` (latency
    when a table is given): what report.json shows before and after, whichever was targeted. A
    budget the model cannot be measured in (a forward the FLOP counter cannot follow) is None:
    the report goes without it."""
    model = lm.model if model is None else model
    names = ["params", "flops"] + (["kv-cache"] if lm.kv_cache_fn is not None else [])
    out: dict[str, float | None] = {}
    if latency_table is not None:
        out["latency"] = Latency(latency_table).measure(model)
    for n in names:
        try:
            out[n] = make_budget(n, lm, batches).measure(model)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            out[n] = None
    return out
