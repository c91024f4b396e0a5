"""Importance of pruning groups; lower means prune first. ``inf``: cannot be pruned now.

Every score is measured by really applying Prune(f) inside `DepthPruner.trial` and rolling it
back, so it sees exactly what the engine would do (width reconciliation, FindAct/FindNorm,
identity patching).

- `AngularScorer` (Eq. 3.11): angle between a block's output with and without the group,
  ``arccos(cos)/pi`` per token, averaged over every calibration token. Block inputs are cached
  (`depthprune.blocks`); a candidate costs one forward of its own block.
- `TaylorScorer` (Eqs. 3.8-3.10): ``(dE/dw * w)^2`` per weight, E the calibration loss summed
  over the set (gradient of the total, then squared), summed over every parameter the group
  removes: its own, and the width-pruned sections of the layers that depend on it. Also the
  width-reconciliation index score of the engine.
- `CrossEntropyScorer`: ``E[CE(p_dense, p_pruned)]`` of the next-token distributions, and
- `PerplexityScorer`: calibration perplexity of the whole pruned model (BlockPruner), both as
  the increase over the current model; a candidate's forward starts at the first block it
  changes (cached block inputs).
- `RandomScorer`, and ``reversed`` (the angular ranking upside down) for ablations.
"""
from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from .._tp import leave_no_graph
from ..blocks import BlockInputs, BlockStates, NotChained, find_blocks, first_block
from ..depth.engine import DepthPruner
from ..depth.reconcile import channel_slices, drop_channels, magnitude_score
from ..errors import UserError
from ..graph.build import default_forward
from ..graph.trace import traceable_output
from ..progress import progress_bar
from .groups import Group

SCORES = ("angular", "angular-last", "bi", "taylor", "ce", "ppl", "output", "random", "reversed")
INF = float("inf")


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token angular distance in [0, 1] between hidden states (last dim is the feature)."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12).clamp(-1, 1)
    return torch.arccos(cos) / math.pi


def changed_paths(steps) -> list[str]:
    """Module paths that pruning ``steps`` replaced or width-pruned."""
    out = []
    for st in steps:
        for op in st.ops:
            if op["op"] == "replace":
                out.append(op["module"])
            elif op["op"] == "width":
                out.extend(path for path, _, _ in op["items"])
            elif op["op"] == "refit":  # compensation changed this layer's weights
                out.append(op["module"])
    return out


class Scorer:
    """``score(pruner, groups) -> {name: score}``; re-scoring schedules call
    ``committed(pruner, group)`` after each real prune so the scorer forgets (or recomputes)
    what the change made stale. During ``measure`` the trial's steps are ``self.trial_steps``."""

    name = "base"
    desc = "scoring"

    def __init__(self, progress: bool = True):
        self.progress = progress
        self.cache: dict[str, float] = {}
        self.trial_steps: list = []
        self._floor: int | None = None  # first block a compensating refit changed (score_compensated)
        self.budget = None  # what a trial also measures besides parameters (set by the schedule that runs it)

    def score(self, pruner: DepthPruner, groups: list[Group]) -> dict[str, float]:
        todo = [g for g in groups if g.name not in self.cache]
        for g in progress_bar(todo, desc=self.desc, unit="unit", enabled=self.progress and len(todo) >= 2):
            self.cache[g.name] = self._trial(pruner, g)
        return {g.name: self.cache[g.name] for g in groups}

    def _trial(self, pruner: DepthPruner, g: Group, compensator=None) -> float:
        """``measure`` inside the trial of ``g``'s units (which also sets ``g.params``), or with
        ``compensator`` inside the trial and the refit that would follow it; ``inf`` with the
        reason in ``g.extra`` when the group cannot be pruned now."""
        at = pruner.version
        budget = self.budget
        before = budget.total(pruner.model, at) if budget is not None and budget.name != "params" else None
        try:
            with pruner.trial(g.units) as steps:
                self.trial_steps = steps
                g.params = sum(s.params_removed for s in steps)
                try:
                    g.cost = g.params if before is None else before - budget.total(pruner.model)
                    g.extra["params_at"] = at  # `Schedule.removes` reuses it on this structure
                    if compensator is None:
                        return float(self.measure(pruner, g))
                    with compensator.what_if(changed_paths(steps)) as first:
                        self._floor = first
                        return float(self.measure(pruner, g))
                except (AttributeError, RuntimeError) as e:
                    # a trial is not run-checked (committing is): a stand-in whose attributes the
                    # model's own code reads, or a width a fixed-size parameter needs (ConvNeXt
                    # V2's GRN), breaks the model here; if the model itself runs, the failure is
                    # the trial's and propagates, as does any other kind
                    problem = pruner._broken()
                    if problem is None:
                        raise
                    raise UserError(f"cannot prune {g.name}: {problem}") from e
        except UserError as e:
            g.extra["why_not"] = str(e)
            return INF
        finally:
            self.trial_steps, self._floor = [], None

    def score_compensated(self, pruner: DepthPruner, groups: list[Group], compensator) -> dict[str, float]:
        """Scores with each trial followed by the refit ``compensator`` would make after it
        (`Compensator.what_if`): what the group costs once compensated. Output scores only."""
        raise UserError(f"compensated scoring needs --score ce or ppl, not {self.name}")

    def measure(self, pruner: DepthPruner, group: Group) -> float:
        raise NotImplementedError

    def committed(self, pruner: DepthPruner, group: Group) -> None:
        """The model changed: forget the scores that may have changed (all, by default)."""
        self.cache.clear()


def _last_change(pruner: DepthPruner, group: Group, blocks) -> int:
    """First block that committing ``group`` changed."""
    return first_block(changed_paths(pruner.steps[len(pruner.steps) - len(group.units):]), blocks)


def block_influence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token ``1 - cos(a, b)`` (ShortGPT's block influence when ``a``/``b`` are a block's input
    and output)."""
    return 1 - F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12).clamp(-1, 1)


#: distance between hidden states -> (per-token function, tokens it averages over)
DISTANCES = {"angular": (angular_distance, "all"), "angular-last": (angular_distance, "last"),
             "bi": (block_influence, "all")}


class AngularScorer(Scorer):
    """Distance between a block's output with and without the group, from cached block inputs.

    ``distance``: ``angular`` (Eq. 3.11, ``arccos(cos)/pi`` per token, mean over every
    calibration token), ``angular-last`` (the same at the last token of each window only, as
    Gromov et al. measure it) or ``bi`` (``1 - cos`` per token, mean over tokens: at block
    granularity exactly ShortGPT's block influence, whose pruned output is the block's input)."""

    name = desc = "angular"

    def __init__(self, model, batches: list, forward_fn: Callable, progress: bool = True, sign: float = 1.0,
                 distance: str = "angular"):
        super().__init__(progress)
        self.blocks = find_blocks(model)
        if not self.blocks:
            raise UserError(f"--score {distance} compares block inputs and outputs, and the model has no repeated "
                            "blocks (no nn.ModuleList of modules that repeat a class); use --score output (or taylor, "
                            "for a model with a calibration loss)")
        self.states = BlockStates(BlockInputs(model, batches, forward_fn, self.blocks))
        self.sign = sign
        self.name = self.desc = distance
        self._distance, self._tokens = DISTANCES[distance]
        self._block_of: dict[str, int] = {}

    def _mean(self, pairs) -> float:
        total, count = 0.0, 0
        for a, b in pairs:
            if self._tokens == "last":
                a, b = a[..., -1, :], b[..., -1, :]
            d = self._distance(a, b)
            total, count = total + float(d.sum()), count + d.numel()
        return total / count

    @torch.no_grad()
    def measure(self, pruner, group) -> float:
        b = group.block
        if b is None:
            raise UserError(f"{group.name} is not inside a repeated block")
        st = self.states
        return self.sign * self._mean((st.cache.call(b, h, i), st.outputs[b][i]) for i, h in enumerate(st.inputs[b]))

    def committed(self, pruner, group) -> None:
        b = _last_change(pruner, group, self.blocks)
        self.states.refresh(b)
        for name in [n for n in self.cache if self._block_of.get(n, 0) >= b]:
            del self.cache[name]

    def score(self, pruner, groups):
        self._block_of.update({g.name: (g.block if g.block is not None else 0) for g in groups})
        return super().score(pruner, groups)

    def block_distance(self, start: int, n: int) -> float:
        """Distance between the inputs of block ``start`` and block ``start + n`` (Gromov's window)."""
        st = self.states
        ends = st.inputs[start + n] if start + n < len(self.blocks) else st.outputs[-1]
        return self._mean(zip(st.inputs[start], ends))


class TaylorScorer(Scorer):
    """Also an engine companion: keeps its importance tensors in step with width pruning, and
    gives the engine its index score."""

    name = desc = "taylor"

    def __init__(self, model, batches: list, loss_fn: Callable | None, progress: bool = True):
        super().__init__(progress)
        if loss_fn is None:
            raise UserError("this model family has no calibration loss for Taylor importance")
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.compute()

    def compute(self) -> None:
        """Gradient of the total calibration loss, then ``(g * w)^2`` per parameter.

        Every floating parameter gets a gradient, whatever its stored ``requires_grad`` (trained
        checkpoints store False everywhere); the flags are restored afterwards. A model with
        half-precision weights is differentiated through a float32 copy (same module order), so
        the model itself is left as it was."""
        model = self.model
        low = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
        work = copy.deepcopy(model).float() if low else model
        params = {id(p): p for p in work.parameters()}
        req = {k: p.requires_grad for k, p in params.items()}
        for p in params.values():
            p.grad = None
            p.requires_grad_(p.is_floating_point())
        try:
            with torch.enable_grad(), leave_no_graph(work):
                for batch in progress_bar(self.batches, desc="taylor gradients", unit="batch",
                                          enabled=self.progress):
                    self.loss_fn(work, batch).backward()
            self.imp: dict[int, dict] = {}
            self.total: dict[int, float] = {}
            for m, w in zip(model.modules(), work.modules()):
                own = {k: p for k, p in w._parameters.items() if p is not None and p.is_floating_point()}
                if not own:
                    continue
                t = {k: (p.grad.detach().double() * p.detach().double()).pow(2) if p.grad is not None
                     else torch.zeros(p.shape, dtype=torch.double) for k, p in own.items()}
                self.imp[id(m)] = t
                self.total[id(m)] = float(sum(v.sum() for v in t.values()))
        finally:
            for k, p in params.items():
                p.grad = None
                p.requires_grad_(req[k])
            model.eval()
        self.cache.clear()

    def present(self) -> float:
        return sum(self.total.get(id(m), 0.0) for m in {id(m): m for m in self.model.modules()}.values())

    def score(self, pruner, groups):
        self._before = self.present()
        return super().score(pruner, groups)

    def measure(self, pruner, group) -> float:
        return self._before - self.present()

    def committed(self, pruner, group) -> None:
        self.compute()  # Algorithm 9: new gradients on the pruned model

    # engine companion protocol
    def index_score(self, module, direction, idxs) -> torch.Tensor:
        t = self.imp.get(id(module))
        if t is None:
            return magnitude_score(module, direction, idxs)
        total = torch.zeros(len(idxs), dtype=torch.float64)
        for s in channel_slices(module, direction, idxs, tensors=t):
            total += s.reshape(len(idxs), -1).sum(1)
        return total

    def on_width(self, module, direction, idxs) -> None:
        t = self.imp.get(id(module))
        if t is None:
            return
        self.total[id(module)] -= float(self.index_score(module, direction, idxs).sum())
        self.imp[id(module)] = drop_channels(module, direction, idxs, t)

    def snapshot(self):
        return dict(self.imp), dict(self.total)

    def restore(self, state) -> None:
        self.imp, self.total = dict(state[0]), dict(state[1])


class _OutputScorer(Scorer):
    """Scores from the whole model's outputs over the calibration batches, reported as the
    change from the current model (so re-scoring schedules compare marginal costs).
    ``logits_fn(model, batch)``: next-token logits ``[batch, tokens, vocab]`` (the adapter's).
    With ``cache`` and repeated blocks, the block inputs of the current model are cached and a
    candidate's forward starts at the first block its trial changed."""

    def __init__(self, model, batches: list, logits_fn: Callable, progress: bool = True, cache: bool = True):
        super().__init__(progress)
        self.model, self.batches, self.logits_fn = model, batches, logits_fn
        self.blocks = find_blocks(model) if cache else []
        self.states = None
        if self.blocks:
            try:
                self.states = BlockStates(BlockInputs(model, batches, logits_fn, self.blocks))
            except NotChained:  # parallel branches, not a chain: every trial runs the whole model
                self.blocks = []
        self.baseline: float | None = None
        self._start = 0

    def score(self, pruner, groups):
        if self.baseline is None and any(g.name not in self.cache for g in groups):
            self.baseline = self.value()
        return super().score(pruner, groups)

    def score_compensated(self, pruner, groups, compensator):
        """See `Scorer.score_compensated`; not cached (they hold for the current model only)."""
        if self.baseline is None:
            self.baseline = self.value()
        return {g.name: self._trial(pruner, g, compensator) for g in groups}

    def measure(self, pruner, group) -> float:
        if self.states is not None:
            start = first_block(changed_paths(self.trial_steps), self.blocks)
            if self._floor is not None:
                start = min(start, self._floor)
            self._start = min(start, len(self.blocks) - 1)
        try:
            return self.value() - self.baseline
        finally:
            self._start = 0

    def committed(self, pruner, group) -> None:
        super().committed(pruner, group)
        self.baseline = None
        if self.states is not None:
            self.states.refresh(_last_change(pruner, group, self.blocks))

    def logits(self):
        """(batch, next-token logits) of the current (trial) model, per calibration batch."""
        for i, b in enumerate(self.batches):
            with self.states.skip_to(self._start, i) if self.states is not None else nullcontext():
                yield b, self.logits_fn(self.model, b)

    def value(self) -> float:
        raise NotImplementedError


class CrossEntropyScorer(_OutputScorer):
    """``E[CE(p_dense, p)]`` over calibration tokens; measured against the current model, so on the
    dense model it is the KL divergence from the dense distribution (an identity scores 0), and
    after pruning the increase of that divergence."""

    name = desc = "ce"

    def __init__(self, model, batches, logits_fn: Callable, progress: bool = True, cache: bool = True):
        with torch.no_grad():  # the dense next-token probabilities, kept in float16
            self.dense = [F.softmax(logits_fn(model, b).float(), -1).half() for b in batches]
        super().__init__(model, batches, logits_fn, progress, cache)

    @torch.no_grad()
    def value(self) -> float:
        total, count = 0.0, 0
        for (b, logits), ref in zip(self.logits(), self.dense):
            logp = F.log_softmax(logits.float(), -1)
            total -= float(torch.einsum("btv,btv->", ref.float(), logp))
            count += logp.shape[0] * logp.shape[1]
        return total / count


class OutputScorer(_OutputScorer):
    """Any model: how far its outputs move from the dense model's on the calibration inputs,
    ``sum ||y - y_dense||^2 / sum ||y_dense||^2`` over every floating output tensor and batch,
    reported as the increase over the current model. Needs neither repeated blocks nor a loss."""

    name = desc = "output"

    def __init__(self, model, batches, forward_fn: Callable | None, progress: bool = True, cache: bool = True):
        fwd = forward_fn or default_forward

        def outputs(m, b) -> list[torch.Tensor]:
            return [t for t in tree_flatten(traceable_output(fwd(m, b)))[0]
                    if isinstance(t, torch.Tensor) and t.is_floating_point()]
        with torch.no_grad():
            self.dense = [[t.detach().double() for t in outputs(model, b)] for b in batches]
        self._norm = max(sum(float(d.pow(2).sum()) for ref in self.dense for d in ref), 1e-30)
        super().__init__(model, batches, outputs, progress, cache)

    @torch.no_grad()
    def value(self) -> float:
        err = 0.0
        for (_, outs), ref in zip(self.logits(), self.dense):
            for y, d in zip(outs, ref):
                err += float((y.double() - d).pow(2).sum())
        return err / self._norm


class PerplexityScorer(_OutputScorer):
    """Calibration perplexity of the whole model, reported as the increase over the current one.
    ``nll_fn(logits, batch) -> (summed next-token NLL, tokens)`` (the adapter's)."""

    name = desc = "ppl"

    def __init__(self, model, batches, logits_fn: Callable, nll_fn: Callable, progress: bool = True,
                 cache: bool = True):
        super().__init__(model, batches, logits_fn, progress, cache)
        self.nll_fn = nll_fn

    @torch.no_grad()
    def value(self) -> float:
        nll, count = 0.0, 0
        for b, logits in self.logits():
            n, c = self.nll_fn(logits, b)
            nll, count = nll + float(n), count + int(c)
        return math.exp(nll / count)


class RandomScorer(Scorer):
    name = desc = "random"

    def __init__(self, seed: int = 0, progress: bool = True):
        super().__init__(progress)
        self.rng = random.Random(seed)

    def measure(self, pruner, group) -> float:
        return self.rng.random()

    def committed(self, pruner, group) -> None:
        pass  # a random order stays the same order
