"""Importance of pruning groups and schedules that prune to a parameter-reduction target."""
from __future__ import annotations

import math
import time

import torch

from ..compensate import Compensator
from ..depth.engine import DepthPruner
from ..errors import UserError
from ..offload import refuse_offloaded
from .budget import BUDGETS, Budget, costs, make_budget
from .config import EFFORTS, GENERIC_SELECTION, PruneConfig
from .groups import GRANULARITIES, Group, make_groups
from .latency import LatencyTable, profile_latency
from .schedules import (SCHEDULES, WINDOW_SCORES, Iterative, Outcome, Paper, Schedule, Shared, SharedIterative, Window,
                        make_schedule, paper_order)
from .scores import (SCORES, AngularScorer, CrossEntropyScorer, OutputScorer, PerplexityScorer, RandomScorer, Scorer,
                     TaylorScorer, angular_distance)

__all__ = ["BUDGETS", "Budget", "costs", "make_budget", "LatencyTable", "profile_latency", "EFFORTS",
           "GENERIC_SELECTION", "GRANULARITIES", "SCHEDULES", "SCORES", "WINDOW_SCORES", "AngularScorer",
           "CrossEntropyScorer", "Group", "Iterative", "Outcome", "Paper", "PerplexityScorer", "PruneConfig",
           "RandomScorer", "Schedule", "Scorer", "Shared", "SharedIterative", "TaylorScorer", "Window",
           "angular_distance", "make_groups", "make_schedule", "make_scorer", "paper_order", "prune_to_target",
           "calibration_perplexity", "collapsed", "COLLAPSE_FACTOR"]


def make_scorer(name: str, lm, batches: list, seed: int = 0, progress: bool = True) -> Scorer:
    if name not in SCORES:
        raise UserError(f"unknown score {name!r}; use one of {', '.join(SCORES)}")
    if name in ("angular", "angular-last", "bi", "reversed"):
        return AngularScorer(lm.model, batches, lm.forward_fn, progress, sign=-1.0 if name == "reversed" else 1.0,
                             distance="angular" if name == "reversed" else name)
    if name == "output":
        return OutputScorer(lm.model, batches, lm.forward_fn, progress)
    if name == "taylor":
        return TaylorScorer(lm.model, batches, lm.loss_fn, progress)
    if name in ("ce", "ppl"):
        if lm.logits_fn is None:
            raise UserError(f"--score {name} needs a language model (next-token logits); {lm.spec} is not one")
        if name == "ce":
            return CrossEntropyScorer(lm.model, batches, lm.logits_fn, progress)
        return PerplexityScorer(lm.model, batches, lm.logits_fn, lm.nll_fn, progress)
    return RandomScorer(seed, progress)


#: calibration perplexity growing more than this factor means the pruned model has collapsed
COLLAPSE_FACTOR = 5.0


@torch.no_grad()
def calibration_perplexity(lm, batches: list) -> float | None:
    """Perplexity of ``lm.model`` on the calibration batches (None for models without next-token
    logits): what `prune` compares before and after to warn about a collapsed model."""
    if lm.logits_fn is None or lm.nll_fn is None:
        return None
    nll, count = 0.0, 0
    for b in batches:
        n, c = lm.nll_fn(lm.logits_fn(lm.model, b), b)
        nll, count = nll + float(n), count + int(c)
    return math.exp(nll / count)


def collapsed(outcome) -> bool:
    """True when the calibration perplexity grew more than `COLLAPSE_FACTOR` times."""
    b, a = outcome.calib_ppl_before, outcome.calib_ppl_after
    return b is not None and a is not None and a > COLLAPSE_FACTOR * b


def prune_to_target(lm, config: PruneConfig, batches: list, *, progress: bool = True,
                    pruner: DepthPruner | None = None, on_step=None, only=None,
                    latency_table=None) -> tuple[DepthPruner, Outcome]:
    """Depth-prune ``lm.model`` in place to ``config.target`` reduction of ``config.budget``
    (parameters by default; `depthprune.importance.budget`), selecting as
    ``config`` says once `PruneConfig.resolved` on ``lm`` (what `depthprune prune --target`
    does with the same flags); the resolved config is ``Outcome.config``.

    ``config.channels`` picks the width-reconciliation indices: ``taylor`` (lowest Taylor
    importance of the dependent layers; one gradient pass over ``batches``) or ``magnitude``.
    ``config.compensate``: refit the residual writer after every pruned group
    (`depthprune.compensate`; the dense block outputs are cached first, on ``batches``).
    ``config.cross_fit``: the compensated re-ranking's trials score each sample with the refit
    made without its fold (`depthprune.compensate.Compensator`); default: with the refit on every
    token, as committed. ``rescore_top``, ``compensated_top``, ``compensated_windows`` and
    ``screen``: see `Schedule`. ``pruner``: the `DepthPruner` of ``lm.model`` to prune with (one
    is made when None); ``on_step(reduction)``: called after every pruned group; ``only``: a
    predicate on `Group`; when given, the schedule chooses only among the groups it accepts (a
    reduced search space, e.g. channel-preserving units only). ``latency_table``: the
    `LatencyTable` of ``lm.model`` that ``budget="latency"`` counts with (default: profiled now).
    """
    config = config.resolved(lm)
    if config.target is None:
        raise UserError("pruning to a target needs one (PruneConfig.target)")
    if not batches:
        raise UserError("pruning to a target needs calibration batches")
    if config.channels not in ("taylor", "magnitude"):
        raise UserError(f"unknown channel score {config.channels!r}; use taylor or magnitude")
    refuse_offloaded(lm.model)
    budget = make_budget(config.budget, lm, batches, latency_table)  # refused here, before any work, where it does not apply
    schedule = make_schedule(config.schedule, rescore_top=config.rescore_top, compensated_top=config.compensated_top,
                             compensated_windows=config.compensated_windows, screen=config.screen,
                             defer_nested=config.defer_nested)
    if pruner is None:
        pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    t0 = time.perf_counter()
    compensator = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn) \
        if config.compensate else None
    if compensator is not None:
        compensator.cross_fit = config.cross_fit
    comp_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    score = config.score
    taylor = None
    if score == "taylor" or (config.channels == "taylor" and lm.loss_fn is not None):
        taylor = TaylorScorer(lm.model, batches, lm.loss_fn, progress)
        pruner.index_score = taylor.index_score
        pruner.companions.append(taylor)
    t1 = time.perf_counter()
    scorer = taylor if score == "taylor" else make_scorer(score, lm, batches, config.seed, progress)
    built = time.perf_counter() - t1
    groups = make_groups(pruner, config.granularity)
    if only is not None:
        groups = [g for g in groups if only(g)]
    before = calibration_perplexity(lm, batches)
    outcome = schedule.run(pruner, scorer, groups, config.target, compensator=compensator, progress=progress,
                           on_step=on_step, budget=budget)
    outcome.config = config
    outcome.compensation_seconds += comp_setup
    outcome.calib_ppl_before, outcome.calib_ppl_after = before, calibration_perplexity(lm, batches)
    if score == "taylor":
        outcome.scoring_seconds += t1 - t0 + built
    else:
        outcome.scoring_seconds += built
        outcome.channel_seconds = t1 - t0
    return pruner, outcome
