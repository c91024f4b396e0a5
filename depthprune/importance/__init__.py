"""Importance of pruning groups and schedules that prune to a parameter-reduction target."""
from __future__ import annotations

import math
import time

import torch

from ..compensate import Compensator
from ..depth.engine import DepthPruner
from ..errors import UserError
from .groups import GRANULARITIES, Group, make_groups
from .schedule import SCHEDULES, Outcome, paper_order, run_schedule
from .scores import (SCORES, AngularScorer, CrossEntropyScorer, OutputScorer, PerplexityScorer, RandomScorer, Scorer,
                     TaylorScorer, angular_distance)

__all__ = ["GRANULARITIES", "SCHEDULES", "SCORES", "AngularScorer", "CrossEntropyScorer", "Group", "Outcome",
           "PerplexityScorer", "RandomScorer", "Scorer", "TaylorScorer", "angular_distance", "make_groups",
           "make_scorer", "paper_order", "prune_to_target", "run_schedule", "calibration_perplexity", "collapsed",
           "COLLAPSE_FACTOR"]


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


def prune_to_target(lm, target: float, score: str = "angular", schedule: str = "paper",
                    granularity: str = "fine", batches: list | None = None, channels: str = "taylor",
                    seed: int = 0, progress: bool = True, pruner: DepthPruner | None = None,
                    on_step=None, rescore_top: int = 0, compensate: bool = False,
                    only=None, compensated_top: int | str = 0,
                    compensated_windows: int = 0, cross_fit: bool = False,
                    screen: bool = False) -> tuple[DepthPruner, Outcome]:
    """Depth-prune ``lm.model`` in place to ``target`` parameter reduction.

    ``channels`` picks the width-reconciliation indices: ``taylor`` (lowest Taylor importance of
    the dependent layers; one gradient pass over ``batches``) or ``magnitude``. ``rescore_top``:
    see `run_schedule`. ``compensate``: refit the residual writer after every pruned group
    (`depthprune.compensate`; the dense block outputs are cached first, on ``batches``).
    ``only``: a predicate on `Group`; when given, the schedule chooses only among the groups it
    accepts (a reduced search space, e.g. channel-preserving units only). ``cross_fit``: the
    compensated re-ranking's trials score each sample with the refit made without its fold
    (`depthprune.compensate.Compensator`); default: with the refit on every token, as committed.
    ``screen``: the groups outside the compensated re-ranking compete by their cross-fitted
    compensated score (`run_schedule`).
    """
    if not batches:
        raise UserError("pruning to a target needs calibration batches")
    if channels not in ("taylor", "magnitude"):
        raise UserError(f"unknown channel score {channels!r}; use taylor or magnitude")
    if pruner is None:
        pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    t0 = time.perf_counter()
    compensator = Compensator(lm.model, batches, lm.forward_fn, logits_fn=lm.logits_fn, nll_fn=lm.nll_fn) \
        if compensate else None
    if compensator is not None:
        compensator.cross_fit = cross_fit
    comp_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    taylor = None
    if score == "taylor" or (channels == "taylor" and lm.loss_fn is not None):
        taylor = TaylorScorer(lm.model, batches, lm.loss_fn, progress)
        pruner.index_score = taylor.index_score
        pruner.companions.append(taylor)
    t1 = time.perf_counter()
    scorer = taylor if score == "taylor" else make_scorer(score, lm, batches, seed, progress)
    built = time.perf_counter() - t1
    groups = make_groups(pruner, granularity)
    if only is not None:
        groups = [g for g in groups if only(g)]
    before = calibration_perplexity(lm, batches)
    outcome = run_schedule(pruner, scorer, groups, target, schedule, progress, on_step, rescore_top, compensator,
                           compensated_top, compensated_windows, screen)
    outcome.compensation_seconds += comp_setup
    outcome.calib_ppl_before, outcome.calib_ppl_after = before, calibration_perplexity(lm, batches)
    if score == "taylor":
        outcome.scoring_seconds += t1 - t0 + built
    else:
        outcome.scoring_seconds += built
        outcome.channel_seconds = t1 - t0
    return pruner, outcome
