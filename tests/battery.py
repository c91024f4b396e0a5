"""The property battery every architecture must pass (issue 13's contracts), as functions.

Each check returns what it found (failures as one-line strings) instead of asserting, so the
tests (`tests/test_architectures.py`) assert on it and `bench/architectures.py` tabulates it.

- `build_graph`: the computation graph builds.
- `list_candidates`: candidate listing, timed.
- `single_prunes`: every listed candidate pruned alone on a fresh deep copy succeeds, removes
  exactly the promised parameters, and leaves a model that runs with every output shape kept.
- `random_sequences`: random prune sequences choosing among the current candidates, with the
  same checks at every step.
- `block_equivalence` / `attention_equivalence` (HF decoders): pruning every unit of one block
  equals deleting the block, the attention unit alone equals skipping the attention sublayer
  (max |delta logit|, fp32).
"""
from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._pytree import tree_flatten

from depthprune.depth import DepthPruner, count_params
from depthprune.graph import CompGraph

from archs import SLOW, ZOO, Arch

#: What block and attention equivalence must reach (fp32).
EXACT = 1e-5


def pruner(arch: Arch) -> DepthPruner:
    return DepthPruner(arch.model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe,
                       on_change=arch.on_change)


def output_shapes(arch: Arch, model) -> list[tuple]:
    """Shapes of every tensor the traced forward returns; raises when the model does not run
    or computes non-finite values."""
    with torch.no_grad():
        out = arch.forward_fn(model, arch.example_inputs)
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RuntimeError("non-finite output")
    return [tuple(t.shape) for t in tensors]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def check_step(arch: Arch, dp: DepthPruner, unit: str, shapes: list[tuple]) -> str | None:
    """Prune ``unit`` on ``dp``; None when the contracts hold, else what broke."""
    try:
        promised = dp.promised_params(unit)
    except Exception as e:  # a listed candidate must have a promise
        return f"{unit}: promise refused ({_short(e)})"
    before = count_params(dp.model)
    try:
        step = dp.prune(unit)
    except Exception as e:
        return f"{unit}: prune refused ({_short(e)})"
    drop = before - count_params(dp.model)
    if drop != promised or step.params_removed != promised:
        return f"{unit}: promised {promised}, removed {drop} (step says {step.params_removed})"
    try:
        got = output_shapes(arch, dp.model)
    except Exception as e:
        return f"{unit}: model does not run after the prune ({_short(e)})"
    if got != shapes:
        return f"{unit}: output shapes {got} != {shapes}"
    return None


@dataclass
class Report:
    """What the battery found on one architecture."""

    name: str
    kind: str
    graph_error: str = ""
    nodes: int = 0
    units: int = 0
    candidates: int = 0
    listing_s: float = 0.0
    single_ok: int = 0
    single_failures: list = field(default_factory=list)
    sequence_steps: int = 0
    sequence_failures: list = field(default_factory=list)
    block_diff: float | None = None
    attention_diff: float | None = None
    equivalence_errors: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def promise_mismatches(self) -> int:
        return sum("promised" in f for f in self.single_failures + self.sequence_failures)


def build_graph(arch: Arch, report: Report) -> CompGraph | None:
    try:
        graph = CompGraph(arch.model, arch.example_inputs, arch.forward_fn)
    except Exception as e:
        report.graph_error = _short(e)
        return None
    report.nodes = graph.g.number_of_nodes()
    return graph


def list_candidates(arch: Arch, report: Report) -> tuple[DepthPruner | None, list[str]]:
    """The base pruning session (graph traced once) and its listed candidates (timed)."""
    try:
        dp = pruner(arch)
    except Exception as e:
        report.graph_error = report.graph_error or _short(e)
        return None, []
    t0 = time.perf_counter()
    try:
        cands = dp.candidates()
    except Exception as e:
        report.graph_error = f"candidates: {_short(e)}"
        return None, []
    report.listing_s = time.perf_counter() - t0
    report.units = len(cands)
    report.candidates = sum(c.candidate for c in cands)
    return dp, [c.unit for c in cands if c.candidate]


def single_prunes(arch: Arch, base: DepthPruner, candidates: list[str], report: Report) -> None:
    shapes = output_shapes(arch, base.model)
    for unit in candidates:
        failure = check_step(arch, copy.deepcopy(base), unit, shapes)
        if failure is None:
            report.single_ok += 1
        else:
            report.single_failures.append(failure)


def current_candidates(dp: DepthPruner) -> list[str]:
    return [c.unit for c in dp.candidates() if c.candidate]


def random_sequences(arch: Arch, base: DepthPruner, report: Report, seeds=(0, 1, 2), steps: int = 15) -> None:
    shapes = output_shapes(arch, base.model)
    for seed in seeds:
        dp = copy.deepcopy(base)
        rng = random.Random(seed)
        for k in range(steps):
            try:
                live = current_candidates(dp)
            except Exception as e:
                report.sequence_failures.append(f"seed {seed} step {k}: candidates raised {_short(e)}")
                break
            if not live:
                break
            unit = rng.choice(live)
            report.sequence_steps += 1
            failure = check_step(arch, dp, unit, shapes)
            if failure is not None:
                report.sequence_failures.append(f"seed {seed} step {k}: {failure}")
                break  # the session may be in any state now


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def block_units(dp: DepthPruner, block: str) -> list[str]:
    """Every unit (transform or attention node) inside the module ``block``."""
    return sorted((u for u in dp.units() if u == block or u.startswith(block + ".")), key=_natural)


def _logit_diff(arch: Arch, model, reference) -> float:
    with torch.no_grad():
        a = arch.forward_fn(model, arch.example_inputs)
        b = arch.forward_fn(reference, arch.example_inputs)
    return float((a - b).abs().max())


def prune_all(dp: DepthPruner, units: list[str]) -> None:
    for u in units:
        if dp.g.nodes[u]["state"] == "live":
            dp.prune(u)


def block_equivalence(arch: Arch, base: DepthPruner, report: Report, b: int = 1) -> None:
    """Every unit of block ``b`` pruned, in natural and in reverse order, against the model
    whose block ``b`` is deleted. Records the larger max |delta logit|."""
    reference = arch.delete_block(b)
    diffs = []
    units = block_units(base, arch.block_path(b))
    for order in (units, units[::-1]):
        dp = copy.deepcopy(base)
        try:
            prune_all(dp, order)
        except Exception as e:
            report.equivalence_errors.append(f"block {b}: {_short(e)}")
            return
        left = [u for u in units if dp.g.nodes[u]["state"] == "live"]
        if left:
            report.equivalence_errors.append(f"block {b}: units left live {left}")
            return
        diffs.append(_logit_diff(arch, dp.model, reference))
    report.block_diff = max(diffs)


def attention_units(dp: DepthPruner, block: str) -> list[str]:
    return [u for u in block_units(dp, block) if dp.g.nodes[u]["kind"] == "attention"]


def attention_equivalence(arch: Arch, base: DepthPruner, report: Report, b: int = 1) -> None:
    """The attention unit of block ``b`` pruned alone, against the model whose block ``b``
    skips its attention sublayer."""
    att = attention_units(base, arch.block_path(b))
    if att != [f"{arch.block_path(b)}.{arch.attention}"]:
        report.equivalence_errors.append(f"attention units of block {b}: {att}")
        return
    dp = copy.deepcopy(base)
    try:
        dp.prune(att[0])
    except Exception as e:
        report.equivalence_errors.append(f"attention {att[0]}: {_short(e)}")
        return
    report.attention_diff = _logit_diff(arch, dp.model, arch.skip_attention(b))


def run_battery(arch: Arch, sequences: bool = True, seeds=(0, 1, 2), steps: int = 15) -> Report:
    """Every check of the battery on ``arch``."""
    t0 = time.perf_counter()
    report = Report(arch.name, arch.kind)
    if build_graph(arch, report) is not None:
        base, candidates = list_candidates(arch, report)
        if base is not None:
            single_prunes(arch, base, candidates, report)
            if sequences:
                random_sequences(arch, base, report, seeds, steps)
            if arch.kind == "decoder":
                block_equivalence(arch, base, report)
                attention_equivalence(arch, base, report)
    report.seconds = time.perf_counter() - t0
    return report


def zoo(names) -> list:
    """``names`` as pytest parameters, the heavy ones (`archs.SLOW`) marked slow."""
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in names]


_sessions: dict = {}


def zoo_session(name: str) -> tuple[Arch, DepthPruner, list[str], Report]:
    """The zoo model ``name``, its base pruning session and its listed candidates, built once per
    name and test process (the tests of one model share them)."""
    if name not in _sessions:
        arch = ZOO[name]()
        report = Report(name, arch.kind)
        assert build_graph(arch, report) is not None, report.graph_error
        base, cands = list_candidates(arch, report)
        assert base is not None, report.graph_error
        _sessions[name] = (arch, base, cands, report)
    return _sessions[name]


def every_candidate_alone(name: str) -> None:
    """Every listed candidate of zoo model ``name`` prunes alone, promise == drop, and runs."""
    arch, base, cands, report = zoo_session(name)
    assert cands, "no candidates listed"
    report.single_failures, report.single_ok = [], 0
    single_prunes(arch, base, cands, report)
    assert report.single_failures == []


def zoo_random_sequences(name: str) -> None:
    """3 seeds x 15 prunes on the quick models; on the heavy CNNs and YOLOs (`SLOW`: 27-76
    candidates, each step lists them all with their promises) one seed of 15 prunes: the other
    two walked the same few block kinds in another order and cost minutes each."""
    arch, base, _, report = zoo_session(name)
    report.sequence_failures = []
    random_sequences(arch, base, report, seeds=(0,) if name in SLOW else (0, 1, 2), steps=15)
    assert report.sequence_failures == []
