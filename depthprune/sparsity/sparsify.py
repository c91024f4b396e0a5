"""Sparsify the surviving layers of a (depth-pruned or dense) model: orchestration.

Targets are the live affine transforms of the computation graph (`Linear`, or a layer type
registered with a 2-D weight layout such as GPT-2's transposed `Conv1D`; attention not
collapsed), except model outputs (the LM head); embeddings and pruned stand-ins are not transforms.
A layer's input is *centred* when its nearest producer in the graph, looking through layout
ops (view, reshape, transpose, ...) and pruned identities, is a norm node.

Calibration goes block by block (`depthprune.blocks`): block ``b`` is run once with hooks that
gather its layers' input statistics, its layers are pruned, and it is run again to give block
``b+1`` the outputs of the already-pruned block. Memory is one block boundary of activations;
the cost about two dense forwards over the calibration set. A model without repeated blocks
(or with targets outside them) is calibrated in one dense forward instead.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..blocks import BlockInputs, NotChained, find_blocks
from ..errors import UserError
from ..offload import resident
from ..progress import progress_bar
from ..graph import CompGraph, backward_bounded_search, module_path, natural_key
from .. import layers as K
from ..graph.build import default_forward
from .metrics import (InputStats, bias_correction, magnitude_metric, nm_mask, stade_metric,
                      parse_pattern, stade_nobias_metric, unstructured_mask, wanda_metric)

METHODS = ("magnitude", "wanda", "stade", "stade-nobias")
LAYOUT_OPS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten",
              "squeeze", "unsqueeze", "expand", "getitem", "clone", "to", "type", "float", "t"}


def _nearest_producers(g, node: str) -> list[str]:
    """The computing nodes feeding ``node``, looking through layout ops and identities."""
    def through(g, n) -> bool:
        d = g.nodes[n]
        return (d["kind"] == K.OTHER and d["op"] in LAYOUT_OPS) or d["state"] != "live"
    return sorted(n for n in backward_bounded_search(g, node, bound=lambda g, n: not through(g, n))
                  if not through(g, n))


def explain(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None) -> list[dict]:
    """Every transform with whether it is sparsified, and whether its input counts as centred."""
    g = CompGraph(model, example_inputs, forward_fn, collapse_attention=False).g
    rows = []
    for n, d in g.nodes(data=True):
        if d["kind"] != K.TRANSFORM or not d["module"]:
            continue
        path = module_path(d["module"])
        m = model.get_submodule(path)
        producers = _nearest_producers(g, n)
        centred = bool(producers) and all(g.nodes[p]["kind"] == K.NORM for p in producers)
        skip = None if K.affine_widths(m) is not None else f"{type(m).__name__} is not a Linear-like layer"
        if d["is_output"]:
            skip = "model output (LM head)"
        rows.append({"layer": path, "centred": centred, "producers": producers, "skip": skip})
    rows.sort(key=lambda r: natural_key(r["layer"]))
    return rows


def metric_name(method: str, centred: bool) -> str:
    if method == "stade":
        return "wanda" if centred else "std+bias"
    return method


@torch.no_grad()
def prune_layer(module: nn.Module, method: str, centred: bool, stats: InputStats | None,
                sparsity: float | None = None, nm: tuple[int, int] | None = None) -> dict:
    """Zero the lowest-metric weights of one affine layer in place (rows: output channels,
    whatever the layer's storage); returns its report row."""
    W = K.affine_weight(module).data  # [out, in]; a view of the stored weight
    before = int(torch.count_nonzero(W))
    correct = method == "stade" and not centred
    add_bias = correct and module.bias is None
    extra = 1 if add_bias else 0  # keep the non-zero count: one weight per added bias entry
    if method == "magnitude":
        metric = magnitude_metric(W)
    elif method == "wanda":
        metric = wanda_metric(W, stats.sq_norm)
    elif method == "stade":
        metric = stade_metric(W, stats, centred)
    elif method == "stade-nobias":
        metric = stade_nobias_metric(W, stats.centred_sq_norm, stats.mean)
    else:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    metric = metric.float()
    mask = nm_mask(metric, *nm, extra=extra) if nm else unstructured_mask(metric, sparsity, extra=extra)
    if correct:
        delta = bias_correction(W, mask, stats.mean)
        if module.bias is None:
            module.bias = nn.Parameter(delta.to(W.dtype))
        else:
            module.bias.data += delta.to(module.bias.dtype)
    W[mask] = 0
    after = int(torch.count_nonzero(W))
    return {"centred": centred, "metric": metric_name(method, centred), "nonzero_before": before,
            "nonzero_after": after, "sparsity": 1 - after / W.numel(), "bias_added": add_bias}


def nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in {id(p): p for p in model.parameters()}.values())


def sparsify(model: nn.Module, method: str, example_inputs: Any, forward_fn: Callable | None = None,
             batches: list | None = None, sparsity: float | None = None, pattern: str | None = None,
             progress: bool = True) -> dict:
    """Sparsify ``model`` in place. Returns ``{"layers": {path: row}, "added_bias": [...], "mode"}``."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if (sparsity is None) == (pattern is None):
        raise UserError("give exactly one of a sparsity (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
    nm = parse_pattern(pattern) if pattern else None
    fwd = forward_fn or default_forward
    rows = [r for r in explain(model, example_inputs, fwd) if r["skip"] is None]
    if not rows:
        raise UserError("no Linear-like layers to sparsify")
    centred = {r["layer"]: r["centred"] for r in rows}
    results: dict[str, dict] = {}

    def do(paths: list[str], stats: dict | None) -> None:
        for p in paths:
            results[p] = {"layer": p, **prune_layer(model.get_submodule(p), method, centred[p],
                                                    stats[p] if stats else None, sparsity, nm)}

    if method == "magnitude":
        do(list(centred), None)
        return _summary(results, "no calibration")
    if not batches:
        raise UserError(f"{method} needs calibration batches")
    blocks = find_blocks(model)
    inside = {p: next((i for i, (bp, _) in enumerate(blocks) if p.startswith(bp + ".")), None) for p in centred}
    cache = None
    if blocks and all(i is not None for i in inside.values()):
        try:
            cache = BlockInputs(model, batches, fwd, blocks)
        except NotChained:  # parallel branches: statistics from whole forwards, below
            pass
    if cache is not None:
        hidden = cache.hidden
        for b, (bp, block) in enumerate(progress_bar(blocks, desc=f"{method}", unit="block", enabled=progress)):
            mine = [p for p, i in inside.items() if i == b]
            if mine:
                with _collect(model, mine) as stats:
                    cache.outputs(b, hidden)
                with resident(block, keep=True):  # offloaded weights: real while pruned, stored back after
                    do(mine, stats)
            hidden = cache.outputs(b, hidden)
        return _summary(results, "block by block")
    with _collect(model, list(centred)) as stats, torch.no_grad():
        for batch in progress_bar(batches, desc="calibrating", unit="batch", enabled=progress):
            fwd(model, batch)
    do(list(centred), stats)
    return _summary(results, "one shot (no repeated blocks)")


def _summary(results: dict, mode: str) -> dict:
    return {"layers": results, "added_bias": sorted(p for p, r in results.items() if r["bias_added"]),
            "mode": mode}


class _collect:
    """Context manager: input statistics of the given Linear layers while it is open."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.model, self.paths = model, paths

    def __enter__(self) -> dict:
        self.stats, self.handles = {}, []
        for p in self.paths:
            m = self.model.get_submodule(p)
            s = self.stats[p] = InputStats(K.affine_widths(m)[0])
            self.handles.append(m.register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0])))
        return self.stats

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def add_biases(model: nn.Module, paths: list[str]) -> None:
    """Give the listed Linear layers a zero bias (before loading a STADE-sparsified state)."""
    for p in paths:
        m = model.get_submodule(p)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(K.affine_widths(m)[1], dtype=m.weight.dtype))

