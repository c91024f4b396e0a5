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
- `CrossEntropyScorer`: ``E[CE(p_dense, p_pruned)]`` of the next-token distributions.
- `PerplexityScorer`: calibration perplexity of the whole pruned model (BlockPruner).
- `RandomScorer`, and ``reversed`` (the angular ranking upside down) for ablations.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..blocks import BlockInputs, find_blocks
from ..depth.engine import DepthPruner, channel_slices, drop_channels, magnitude_score
from ..errors import UserError
from .groups import Group

SCORES = ("angular", "taylor", "ce", "ppl", "random", "reversed")
INF = float("inf")


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token angular distance in [0, 1] between hidden states (last dim is the feature)."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12).clamp(-1, 1)
    return torch.arccos(cos) / math.pi


class Scorer:
    """``score(pruner, groups) -> {name: score}``; re-scoring schedules call
    ``committed(pruner, group)`` after each real prune so the scorer forgets (or recomputes)
    what the change made stale."""

    name = "base"
    desc = "scoring"

    def __init__(self, progress: bool = True):
        self.progress = progress
        self.cache: dict[str, float] = {}

    def score(self, pruner: DepthPruner, groups: list[Group]) -> dict[str, float]:
        todo = [g for g in groups if g.name not in self.cache]
        for g in tqdm(todo, desc=self.desc, unit="unit", disable=not self.progress or None, leave=False):
            try:
                with pruner.trial(g.units) as steps:
                    g.params = sum(s.params_removed for s in steps)
                    self.cache[g.name] = float(self.measure(pruner, g))
            except UserError as e:
                g.extra["why_not"] = str(e)
                self.cache[g.name] = INF
        return {g.name: self.cache[g.name] for g in groups}

    def measure(self, pruner: DepthPruner, group: Group) -> float:
        raise NotImplementedError

    def committed(self, pruner: DepthPruner, group: Group) -> None:
        """The model changed: forget the scores that may have changed (all, by default)."""
        self.cache.clear()


class AngularScorer(Scorer):
    name = desc = "angular"

    def __init__(self, model, batches: list, forward_fn: Callable, progress: bool = True, sign: float = 1.0):
        super().__init__(progress)
        self.blocks = find_blocks(model)
        if not self.blocks:
            raise UserError("angular distance needs a model with repeated blocks (use --score taylor)")
        self.cache_inputs = BlockInputs(model, batches, forward_fn, self.blocks)
        self.sign = sign
        self.inputs: list[list[torch.Tensor]] = []
        self.outputs: list[list[torch.Tensor]] = []
        self._refresh(0)

    @torch.no_grad()
    def _refresh(self, start: int) -> None:
        """Recompute the cached block inputs/outputs from block ``start`` on."""
        del self.inputs[start:], self.outputs[start:]
        h = self.cache_inputs.hidden if start == 0 else self.outputs[start - 1]
        for b in range(start, len(self.blocks)):
            self.inputs.append(h)
            h = self.cache_inputs.outputs(b, h)
            self.outputs.append(h)

    @torch.no_grad()
    def measure(self, pruner, group) -> float:
        b = group.block
        if b is None:
            raise UserError(f"{group.name} is not inside a repeated block")
        total, count = 0.0, 0
        for i, h in enumerate(self.inputs[b]):
            d = angular_distance(self.cache_inputs.call(b, h, i), self.outputs[b][i])
            total += float(d.sum())
            count += d.numel()
        return self.sign * total / count

    def committed(self, pruner, group) -> None:
        b = group.block if group.block is not None else 0
        self._refresh(b)
        for name in [n for n in self.cache if self._block_of.get(n, 0) >= b]:
            del self.cache[name]

    def score(self, pruner, groups):
        self._block_of = {g.name: (g.block if g.block is not None else 0) for g in groups}
        return super().score(pruner, groups)

    def block_distance(self, start: int, n: int) -> float:
        """Angular distance between the inputs of block ``start`` and block ``start + n`` (Gromov)."""
        ends = self.inputs[start + n] if start + n < len(self.blocks) else self.outputs[-1]
        total, count = 0.0, 0
        for a, b in zip(self.inputs[start], ends):
            d = angular_distance(a, b)
            total, count = total + float(d.sum()), count + d.numel()
        return total / count


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
        """Gradient of the total calibration loss, then ``(g * w)^2`` per parameter."""
        model = self.model
        params = {id(p): p for p in model.parameters()}
        req = {k: p.requires_grad for k, p in params.items()}
        for p in params.values():
            p.grad = None
        try:
            for batch in tqdm(self.batches, desc="taylor gradients", unit="batch", disable=not self.progress or None,
                              leave=False):
                self.loss_fn(model, batch).backward()
        finally:
            model.eval()
        self.imp: dict[int, dict] = {}
        self.total: dict[int, float] = {}
        for m in model.modules():
            own = {k: p for k, p in m._parameters.items() if p is not None and req.get(id(p))}
            if not own:
                continue
            t = {k: (p.grad.detach().double() * p.detach().double()).pow(2) if p.grad is not None
                 else torch.zeros(p.shape, dtype=torch.double) for k, p in own.items()}
            self.imp[id(m)] = t
            self.total[id(m)] = float(sum(v.sum() for v in t.values()))
        for p in params.values():
            p.grad = None
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
    """Scores from a full forward of the pruned model over the calibration batches."""

    def __init__(self, model, batches: list, progress: bool = True):
        super().__init__(progress)
        self.model, self.batches = model, batches


class CrossEntropyScorer(_OutputScorer):
    """Reported minus the dense distribution's own entropy (so it is the KL divergence from the
    dense model; ranks exactly like the cross-entropy, and an identity scores 0)."""

    name = desc = "ce"

    def __init__(self, model, batches, progress=True):
        super().__init__(model, batches, progress)
        with torch.no_grad():  # the dense next-token distributions, kept in float16
            self.dense = [F.log_softmax(self.model(input_ids=b[0], use_cache=False).logits.float(), -1).half()
                          for b in batches]
        self.entropy = self.cross_entropy()

    @torch.no_grad()
    def cross_entropy(self) -> float:
        total, count = 0.0, 0
        for b, ref in zip(self.batches, self.dense):
            logp = F.log_softmax(self.model(input_ids=b[0], use_cache=False).logits.float(), -1)
            total += float(-(ref.float().exp() * logp).sum(-1).sum())
            count += logp.shape[0] * logp.shape[1]
        return total / count

    def measure(self, pruner, group) -> float:
        return self.cross_entropy() - self.entropy


class PerplexityScorer(_OutputScorer):
    """Reported as the increase over the current model's calibration perplexity."""

    name = desc = "ppl"

    def score(self, pruner, groups):
        if any(g.name not in self.cache for g in groups):
            self.baseline = self.perplexity()
        return super().score(pruner, groups)

    def measure(self, pruner, group) -> float:
        return self.perplexity() - self.baseline

    @torch.no_grad()
    def perplexity(self) -> float:
        from ..adapters.hf import next_token_nll
        nll = sum(float(next_token_nll(self.model, b[0], "sum")) for b in self.batches)
        return math.exp(nll / sum(b[0][:, 1:].numel() for b in self.batches))


class RandomScorer(Scorer):
    name = desc = "random"

    def __init__(self, seed: int = 0, progress: bool = True):
        super().__init__(progress)
        self.rng = random.Random(seed)

    def measure(self, pruner, group) -> float:
        return self.rng.random()

    def committed(self, pruner, group) -> None:
        pass  # a random order stays the same order
