"""Measured latency per module (``depthprune profile``, ``prune --budget latency``).

`profile_latency` times ``rounds`` forwards of one input with a pre- and post-forward hook on
every module (synchronizing the device where it runs asynchronously), and keeps each module's
median *exclusive* time: its own forward less its submodules' (what is left of the root is the
time outside every submodule: embedding gathers, functional code, the hooks' own cost). The
`LatencyTable` then estimates the latency of any structure the pruner makes from the dense
model: the sum of the exclusive times of the modules still there (a module replaced by a
stand-in, or gone with its parent, costs nothing), each scaled by the fraction of its own
parameters left (a layer width reconciliation narrowed computes that much less). The
estimate is deterministic, so ranking and stopping do not depend on timing noise; the noise is
measured once, and the table says how large it was (``spread``).

A table is valid for the architecture it was measured on (`depthprune.depth.plan.fingerprint`:
parameter names and shapes); ``device``, ``dtype``, ``threads`` and ``shape`` say where and on
what it was measured (a table measured on the deployment device may be used to prune anywhere).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..depth.plan import fingerprint
from ..errors import UserError
from ..graph.build import default_forward
from ..progress import progress_bar

TABLE_FORMAT = "depthprune-latency/1"


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def input_shape(inputs: Any) -> list:
    """The shapes of the tensors in ``inputs`` (nested as the inputs are)."""
    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape)
    if isinstance(inputs, dict):
        return [input_shape(v) for v in inputs.values() if isinstance(v, (torch.Tensor, dict, list, tuple))]
    if isinstance(inputs, (list, tuple)):
        return [input_shape(v) for v in inputs if isinstance(v, (torch.Tensor, dict, list, tuple))]
    return []


@dataclass
class LatencyTable:
    """Median exclusive seconds per module of one forward (``modules``: name -> ``{"type": class
    name, "params": own parameters, "s": seconds}``), measured on the architecture ``fingerprint``."""

    fingerprint: str
    device: str
    dtype: str
    threads: int
    shape: list
    rounds: int
    total_s: float  # median wall time of one whole forward
    spread: float  # (slowest - fastest) / median of the whole forward over the rounds
    modules: dict[str, dict] = field(default_factory=dict)
    decode_context: int = 0  # 0: a plain forward of ``shape``; N: one decode step after N cached tokens
    hook_s: float = 0.0  # the timing hooks' own cost per module call, taken out of the times

    def estimate(self, model: nn.Module) -> float:
        """Seconds of one forward of ``model`` (the measured one, or a pruned copy of it)."""
        total = 0.0
        for name, m in model.named_modules(remove_duplicate=False):
            e = self.modules.get(name)
            if e is None or type(m).__name__ != e["type"]:
                continue  # not measured, or replaced by a stand-in
            total += e["s"] * (_own_params(m) / e["params"] if e["params"] else 1.0)
        return total

    def check(self, model: nn.Module, what: str = "the latency table") -> None:
        """`UserError` unless the table was measured on ``model``'s architecture."""
        fp = fingerprint(model)
        if fp != self.fingerprint:
            raise UserError(f"{what} was measured on another model (fingerprint {self.fingerprint}, this model's is "
                            f"{fp}); measure this one with `depthprune profile`")

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, what: str = "latency table") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise UserError(f"{what} is not a depthprune latency table (format {TABLE_FORMAT}; "
                            "`depthprune profile` writes one)")
        try:
            mods = {str(k): {"type": str(v["type"]), "params": int(v["params"]), "s": float(v["s"])}
                    for k, v in data["modules"].items()}
            t = cls(fingerprint=str(data["fingerprint"]), device=str(data["device"]), dtype=str(data["dtype"]),
                    threads=int(data["threads"]), shape=list(data["shape"]), rounds=int(data["rounds"]),
                    total_s=float(data["total_s"]), spread=float(data["spread"]), modules=mods,
                    decode_context=int(data.get("decode_context", 0)), hook_s=float(data.get("hook_s", 0.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{what} is damaged ({type(e).__name__}: {e}); measure it again with "
                            "`depthprune profile`") from None
        if any(not (v["s"] >= 0 and v["params"] >= 0) for v in mods.values()) or not t.total_s > 0:
            raise UserError(f"{what} is damaged (negative or missing times); measure it again with "
                            "`depthprune profile`")
        return t


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> str:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"


@torch.no_grad()
def profile_latency(model: nn.Module, forward_fn: Callable | None, inputs: Any, rounds: int = 10, warmup: int = 2,
                    progress: bool = True, decode_context: int = 0) -> LatencyTable:
    """The `LatencyTable` of ``model`` on ``inputs`` (``forward_fn(model, inputs)``): ``warmup``
    untimed forwards, then ``rounds`` timed ones with the hooks and ``rounds`` without (``forward_fn``
    None: ``model(*inputs)``, as a traced model is called). Each
    module call's hooks leak their own cost into the calling module's time; that cost per call
    (the hooked forward less the plain one, over the calls a forward makes) is taken out of each
    module per call made inside it, so the times add up to the plain forward (``total_s``).
    ``decode_context``: recorded in the table, the tokens a decode step's ``forward_fn`` has in
    its cache (`depthprune.eval.speed.decode_step`)."""
    if rounds < 1:
        raise UserError("profiling latency needs at least one timed round")
    forward_fn = forward_fn or default_forward
    device = model_device(model)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # a module is named by where it is called from: one shared by several parents (one activation
    # object in every block) is timed under each parent's path, as the stand-in replacing it in one
    # parent is found there
    names = {id(m): n for n, m in model.named_modules()}
    attrs = {(id(m), id(c)): a for _, m in model.named_modules(remove_duplicate=False) for a, c in m.named_children()}
    spent: dict[str, float] = {}
    inside: dict[str, int] = {}  # calls made directly inside each module's calls, one forward
    calls: list[list] = []  # the modules running now: [id, start, time in calls made inside, name, those calls]

    def pre(m, args):
        sync()
        a = attrs.get((calls[-1][0], id(m))) if calls else None
        name = names[id(m)] if a is None else f"{calls[-1][3]}.{a}" if calls[-1][3] else a
        calls.append([id(m), time.perf_counter(), 0.0, name, 0])

    def post(m, args, out):
        sync()
        t = time.perf_counter()
        while calls and calls[-1][0] != id(m):  # a call that raised inside (always_call hooks run anyway)
            calls.pop()
        if not calls:
            return
        _, start, inner, n, k = calls.pop()
        spent[n] = spent.get(n, 0.0) + (t - start) - inner
        inside[n] = inside.get(n, 0) + k
        if calls:
            calls[-1][2] += t - start
            calls[-1][4] += 1
        else:  # a call of forward_fn's own: its hooks leak into the time outside every module
            inside[""] = inside.get("", 0) + 1

    def hooked() -> list:
        return [h for m in model.modules()
                for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True))]

    def unhook(handles: list) -> None:
        for h in handles:
            h.remove()

    handles = hooked()
    try:
        for _ in range(warmup):
            forward_fn(model, inputs)
    finally:
        unhook(handles)
    per_round: list[dict[str, float]] = []
    walls, plain = [], []  # with and without the hooks, interleaved: the same drift in both
    for _ in progress_bar(range(rounds), desc="profiling", unit="round", enabled=progress):
        plain.append(_timed(forward_fn, model, inputs, sync))
        spent.clear()
        inside.clear()
        calls.clear()
        handles = hooked()
        try:
            walls.append(_timed(forward_fn, model, inputs, sync))
        finally:
            unhook(handles)
        per_round.append(dict(spent))
    mods = dict(model.named_modules(remove_duplicate=False))
    order = {n: i for i, n in enumerate(mods)}
    wall = statistics.median(plain)
    hook = max(0.0, statistics.median(walls) - wall) / max(1, sum(inside.values()))
    table = {n: {"type": type(mods[n]).__name__, "params": _own_params(mods[n]),
                 "s": max(0.0, statistics.median(max(0.0, r.get(n, 0.0)) for r in per_round) - hook * inside.get(n, 0))}
             for n in sorted(set().union(*per_round) & order.keys(), key=order.get)}
    # the medians add up to the median forward: what is left (forward_fn's own code) goes to the
    # root, a surplus (medians of different rounds) is shared out in proportion
    root = table.setdefault("", {"type": type(model).__name__, "params": _own_params(model), "s": 0.0})
    measured = sum(v["s"] for v in table.values())
    if measured <= wall:
        root["s"] += wall - measured
    else:
        for v in table.values():
            v["s"] *= wall / measured
    return LatencyTable(fingerprint=fingerprint(model), device=str(device), dtype=model_dtype(model),
                        threads=torch.get_num_threads(), shape=input_shape(inputs), rounds=rounds, total_s=wall,
                        spread=(max(plain) - min(plain)) / wall, modules=table, decode_context=decode_context,
                        hook_s=hook)


def _timed(forward_fn: Callable, model: nn.Module, inputs: Any, sync: Callable) -> float:
    sync()
    t0 = time.perf_counter()
    forward_fn(model, inputs)
    sync()
    return time.perf_counter() - t0
