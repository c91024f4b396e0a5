"""Schedules: which group to prune next, until a parameter-reduction target is reached; one
class each (a `Schedule`), by name in `SCHEDULES`.

- ``paper`` (`Paper`, Algorithm 8, one shot): score once; MHA and non-MHA groups ranked separately and
  taken non-MHA, MHA, non-MHA, non-MHA, MHA, ... (the MHA slot when ``step % 3 == 1``,
  counting from 0); a model without attention groups is simply taken in score order.
- ``iterative`` (`Iterative`, Algorithm 9 for CNNs; for LLMs the thesis's open re-scoring): re-score after
  every prune (angular: only the blocks whose inputs changed), same slot rule.
- ``shared`` (`Shared`): one shot, one ranking of every group by score per parameter removed toward the
  target (a group counts at most the parameters still missing, so near the target a big group
  is not preferred for parameters that only overshoot).
- ``shared-iterative`` (`SharedIterative`): that ranking, re-scored after every prune.
- ``window`` (`Window`, Gromov et al., block granularity; ``angular-last`` is their distance, measured at
  the last token; ``angular`` averages it over every token): the contiguous window of ``n``
  blocks whose first input is closest to its last output, ``n`` the fewest blocks reaching the
  target.

Every schedule stops at the first step whose cumulative reduction reaches the target, and
chooses that last group so the reduction lands as close above the target as the groups allow:
while the schedule's next group does not reach the target it is taken as ranked; when it would
reach it, the group taken is, among the remaining groups the schedule may take at that step (its
ranking and slot rules), the one that reaches the target with the fewest parameters, the better
ranked on ties (`choose_next`). Only the last group can leave the schedule's order. ``window``
removes one contiguous window and keeps its own rule. Reduction counts all parameters, tied ones
once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

from ..depth.engine import DepthPruner, count_params
from ..errors import UserError
from ..progress import progress_bar
from .budget import Budget
from .groups import Group
from .scores import INF, AngularScorer, Scorer, angular_distance, changed_paths

#: the distances the window schedule can compare (its scorer an `AngularScorer`)
WINDOW_SCORES = ("angular-last", "angular", "bi")


@dataclass
class Outcome:
    applied: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    scoring_seconds: float = 0.0  # building the scorer and scoring
    channel_seconds: float = 0.0  # the Taylor pass that only picks reconciliation channels
    pruning_seconds: float = 0.0
    reached: bool = False
    compensation: list = field(default_factory=list)  # one record per refit (see depthprune.compensate)
    compensation_seconds: float = 0.0
    calib_ppl_before: float | None = None  # calibration perplexity of the model before and after
    calib_ppl_after: float | None = None
    config: object = None  # the resolved `PruneConfig` that ran (`prune_to_target`)
    budget: str = "params"  # what the target counts (`depthprune.importance.budget`)
    cost_before: float = 0.0  # the budget's total before and after
    cost_after: float = 0.0


def paper_order(groups: list[Group], scores: dict[str, float]) -> list[Group]:
    """Algorithm 8's order: two sorted lists, the MHA slot on steps 1, 4, 7, ..."""
    key = lambda g: (scores[g.name], g.name)  # noqa: E731
    mha = sorted((g for g in groups if g.mha), key=key)
    other = sorted((g for g in groups if not g.mha), key=key)
    if not mha or not other:
        return mha + other
    out, step = [], 0
    while mha or other:
        first, second = (mha, other) if step % 3 == 1 else (other, mha)
        out.append((first or second).pop(0))
        step += 1
    return out


def _per_param(g: Group, s: float, missing: float) -> float:
    """Score per unit of the budget (parameters by default) the group removes toward the target
    (``missing`` still to go)."""
    return s / min(g.cost, missing) if g.cost > 0 else INF


def choose_next(ordered: list[Group], removes, goal: float) -> Group | None:
    """The group a schedule takes next from ``ordered`` (its ranking, best first).

    ``removes(group)``: parameters the group would remove from the current model (None when it
    cannot be pruned now); ``goal``: parameters still to remove to reach the target. The first
    prunable group is taken when it does not reach the goal; otherwise the step is the last one,
    and the group taken is the one reaching the goal with the fewest parameters (the smallest
    overshoot), the better ranked on ties. None when no group can be pruned."""
    best: tuple[Group, int] | None = None
    for g in ordered:
        p = removes(g)
        if p is None:
            continue
        if best is None and p < goal:
            return g
        if p >= goal and (best is None or p < best[1]):
            best = (g, p)
    return best[0] if best is not None else None


def lazily(groups: list[Group], fresh: set[str], rank, rescore, budget: int, admits=lambda g: True,
           cut: tuple | None = None) -> None:
    """Lazy greedy re-scoring: while the best stale group of ``groups`` (by ``rank``; stale: its
    name not in ``fresh``) ranks below every fresh group ``admits`` and below ``cut``,
    ``rescore(group)`` it and count it fresh; at most ``budget`` times. Exact when a prune never
    makes a group cheaper."""
    for _ in range(budget):
        stale = min((g for g in groups if g.name not in fresh), key=rank, default=None)
        best = min([rank(g) for g in groups if g.name in fresh and admits(g)] + ([cut] if cut else []), default=None)
        if stale is None or (best is not None and rank(stale) >= best):
            break
        rescore(stale)
        fresh.add(stale.name)


def removed_blocks(states) -> set[int]:
    """Blocks whose output equals their input on the current model (pruned away completely)."""
    return {b for b in range(len(states.inputs)) if states.passes(b)}


def closest_windows(groups: list[Group], states, longest: int, prunable) -> list[Group]:
    """Runs of whole blocks worth re-ranking once compensated, on the current model (blocks
    already removed are skipped, so a run may close a gap): for each length ``n`` in
    ``2..longest``, the run of ``n`` consecutive whole-block groups of ``groups`` (all prunable
    now) whose first input is closest to its last output (mean angular distance over calibration
    tokens; Gromov et al.'s rule), as one group of kind ``window`` (``extra["members"]``: its
    block groups); then the whole blocks just before and after each removed run, which a refit
    in the block before the run would absorb with it. ``states``: the current
    `depthprune.blocks.BlockStates`."""
    by_block = {g.block: g for g in groups if g.kind == "block" and g.block is not None and prunable(g)}
    gone = removed_blocks(states)
    order = [b for b in range(len(states.inputs)) if b not in gone]
    out = []
    for n in range(2, longest + 1):
        best: tuple[float, int] | None = None
        for k in range(len(order) - n + 1):
            run = order[k:k + n]
            if all(b in by_block for b in run):
                d = sum(float(angular_distance(a, o).mean()) for a, o in zip(states.inputs[run[0]], states.outputs[run[-1]]))
                if best is None or d < best[0]:
                    best = (d, k)
        if best is not None:
            run = [by_block[b] for b in order[best[1]:best[1] + n]]
            out.append(Group(f"{run[0].name}..{run[-1].name}", [u for g in run for u in g.units], False, run[0].block,
                             "window", extra={"members": run}))
    for k in range(len(order) - 1):
        if order[k + 1] - order[k] > 1:  # a removed run between them
            out.extend(by_block[b] for b in order[k:k + 2] if b in by_block and by_block[b] not in out)
    return out


class Schedule:
    """Which group to prune next, until a target: ``Paper().run(pruner, scorer, groups, 0.2)``.

    The options (constructor) and a run's arguments (`run`) are those of every schedule;
    ``rescore_top`` (re-scoring schedules): 0 re-scores every group after each prune; ``K``
    re-scores lazily, best stale score first, until a fresh score is no worse than every stale
    one or ``K`` groups were re-scored (lazy greedy: exact when a prune never makes another
    group cheaper).

    ``compensated_top`` (``M``, with a compensator, re-scoring schedules): each step re-ranks its
    best ``M`` groups by their score once compensated (`Scorer.score_compensated`); ``"all"``:
    every score is the compensated one (the lazy re-scoring of ``rescore_top`` then re-scores
    compensated trials), so a group whose refit repairs most of its cost is seen however high its
    plain score.
    ``compensated_windows`` (``W`` >= 2, with ``compensated_top``): the re-ranked set also holds,
    for each length 2..``W``, the run of whole blocks chosen by `closest_windows`: one refit
    absorbs a removed run (ReplaceMe), which its blocks' plain scores, taken one at a time, do not
    see.
    ``screen`` (with a count ``compensated_top``): the groups outside the re-ranked set compete
    too, by their *cross-fitted* compensated score (each calibration sample scored with the refit
    made without its fold; every group once at the first step, then lazily, best stale score
    first, while it ranks above the best candidate, at most ``rescore_top`` re-scores, all when 0).
    A group whose refit repairs most of its cost is seen however high its plain score, and
    it must win on a score that does not count the refit's fit to the tokens it is measured on.
    ``defer_nested`` (with a lazy ``rescore_top``): a group whose units are a strict part of a
    sublayer group of the pool (one transform of an MLP) is not scored in the first pass; it
    ranks as its sublayer does per unit of the budget (just ahead of it) until the lazy re-scoring
    reaches it (then it is scored like any other): the transforms of a sublayer at the front are
    tried, those of sublayers that cost much are not.

    A subclass names itself (``name``, the key of `SCHEDULES`) and implements `select`, which
    prunes with the helpers below (`prune`, `scored`, `choose`, ...) until the target; `run`
    holds what every schedule shares (checks, progress, the `Outcome`)."""

    name: ClassVar[str]
    rescoring: ClassVar[bool] = False  # re-scores after every prune (the scorer hears of each commit)

    def __init__(self, *, rescore_top: int = 0, compensated_top: int | str = 0, compensated_windows: int = 0,
                 screen: bool = False, defer_nested: bool = False):
        self.rescore_top, self.compensated_top = rescore_top, compensated_top
        self.compensated_windows, self.screen, self.defer_nested = compensated_windows, screen, defer_nested
        self.budget = Budget()  # what the target counts (`run`'s ``budget``)

    @property
    def every(self) -> bool:
        """Every score is a compensated one (``compensated_top="all"``)."""
        return self.compensated_top == "all"

    def check(self, target: float, compensator) -> None:
        if self.rescore_top < 0:
            raise UserError(f"--rescore-top must be 0 (all) or a positive count, got {self.rescore_top}")
        if not 0 <= target < 1:
            raise UserError(f"--target must be a fraction in [0, 1), got {target}")
        top = self.compensated_top
        if top != "all" and not (isinstance(top, int) and top >= 0):
            raise UserError(f"--rescore-compensated must be a count or 'all', got {top!r}")
        if top and (compensator is None or not self.rescoring):
            raise UserError("--rescore-compensated needs compensation and a re-scoring schedule "
                            "(iterative or shared-iterative)")
        if self.screen and (self.every or not top):
            raise UserError("--rescore-outsiders screens the groups outside the compensated re-ranking; it needs "
                            "--rescore-compensated M (a count)")
        if self.defer_nested and not (self.rescoring and self.rescore_top):
            raise UserError("deferring nested groups needs lazy re-scoring (--rescore-top K with a re-scoring schedule)")
        w = self.compensated_windows
        if w and (w < 2 or not top):
            raise UserError(f"--rescore-windows must be 0 (off) or a run length of at least 2, with --rescore-compensated; "
                            f"got {w}")

    def run(self, pruner: DepthPruner, scorer: Scorer, groups: list[Group], target: float, *, compensator=None,
            progress: bool = True, on_step=None, budget: Budget | None = None) -> Outcome:
        """Prune ``groups`` in the schedule's order until ``target``, the fraction of ``budget``
        (`depthprune.importance.budget`; default parameters) removed; ``on_step(reduction)`` is
        called after every pruned group (e.g. to evaluate intermediate targets on the way).

        ``compensator`` (`depthprune.compensate.Compensator`): after every pruned group, refit the
        residual writer of the changed block; the refit is recorded as a ``refit`` operation of the
        group's last step (weights only: it changes no structure)."""
        self.check(target, compensator)
        self.pruner, self.scorer, self.target, self.compensator, self.on_step = pruner, scorer, target, compensator, on_step
        self.budget = scorer.budget = budget or Budget()
        self.out = Outcome(params_before=count_params(pruner.model), budget=self.budget.name)
        self.before = self.out.cost_before = self.cost()
        if self.before <= 0:
            raise UserError(f"the model has no {self.budget.unit} to remove (--budget {self.budget.name})")
        self.remaining = list(groups)
        self.bar = progress_bar(total=round(100 * target, 2), desc="reduction %", unit="%", enabled=progress,
                                bar_format="{desc}: {n:.2f}/{total:.2f} [{elapsed}] {postfix}")
        if target > 0:
            self.select()
        self.bar.close()
        self.out.params_after = count_params(pruner.model)
        self.out.cost_after = self.cost()
        self.out.reached = self.reduction() >= target
        return self.out

    def select(self) -> None:
        """Prune groups of ``self.remaining`` (`prune`) until the target is reached or none is left."""
        raise NotImplementedError

    # helpers of `select`, on the run `run` set up

    def cost(self) -> float:
        """The budget's total on the current model."""
        return self.budget.total(self.pruner.model, self.pruner.version)

    def reduction(self) -> float:
        return (self.before - self.cost()) / self.before

    def missing(self) -> float:
        """Budget still to remove to reach the target (at least 1)."""
        return max(self.target * self.before - (self.before - self.cost()), 1.0)

    def prune(self, g: Group, score: float) -> None:
        """Prune ``g`` (recorded with its ``score``), refit after it, and drop it from ``remaining``."""
        pruner, out = self.pruner, self.out
        t0 = time.perf_counter()
        steps = [pruner.prune(u, score) for u in g.units]
        out.pruning_seconds += time.perf_counter() - t0
        if self.compensator is not None:
            t0 = time.perf_counter()
            rec = self.compensator.compensate(changed_paths(steps))
            out.compensation_seconds += time.perf_counter() - t0
            if rec is not None:
                out.compensation.append({"group": g.name, **rec})
                if rec.get("writer") and rec.get("alpha") is not None:
                    steps[-1].ops.append({"op": "refit", "module": rec["writer"], "block": rec["block"],
                                          "alpha": rec["alpha"], "tokens": rec["tokens"]})
        r = self.reduction()
        out.applied.append({"unit": g.name, "units": g.units, "kind": g.kind, "block": g.block, "score": score,
                            "params_removed": sum(s.params_removed for s in steps), "reduction": r})
        self.bar.n = round(100 * min(r, self.target), 2)
        self.bar.set_postfix_str(f"step {len(out.applied)}: {g.name}", refresh=False)
        self.bar.refresh()
        if self.on_step is not None:
            self.on_step(r)
        for member in [g, *g.extra.get("members", [])]:
            if member in self.remaining:
                self.remaining.remove(member)
        if self.rescoring:  # one-shot schedules never look at a score again
            t0 = time.perf_counter()
            self.scorer.committed(pruner, g)
            out.scoring_seconds += time.perf_counter() - t0

    def scored(self, gs: list[Group]) -> dict[str, float]:
        """Scores of ``gs`` on the current model (compensated ones with ``compensated_top="all"``)."""
        t0 = time.perf_counter()
        s = self.scorer.score_compensated(self.pruner, gs, self.compensator) if self.every \
            else self.scorer.score(self.pruner, gs)
        self.out.scoring_seconds += time.perf_counter() - t0
        return s

    def prunable(self, g: Group) -> bool:
        return all(self.pruner.why_not(u) is None for u in g.units)

    def removes(self, g: Group) -> float | None:
        """What ``g`` removes of the budget from the current model (measured in a trial, or by the
        last one on this structure: a scoring trial's), None if it cannot now."""
        if not self.prunable(g):
            return None
        at = self.pruner.version
        if g.extra.get("params_at") == at:
            return g.cost
        before = self.cost()
        try:
            with self.pruner.trial(g.units) as steps:
                g.params = sum(s.params_removed for s in steps)
                g.cost = before - self.budget.total(self.pruner.model)
        except (UserError, AttributeError, RuntimeError):  # or the trial's model does not run (FLOPs run it)
            return None
        g.extra["params_at"] = at
        return g.cost

    def choose(self, ordered: list[Group]) -> Group | None:
        """`choose_next` on the current model."""
        return choose_next(ordered, self.removes, self.target * self.before - (self.before - self.cost()))


class Paper(Schedule):
    """Algorithm 8, one shot: MHA and non-MHA groups ranked separately, the MHA slot on steps 1, 4, 7, ..."""

    name = "paper"

    def select(self) -> None:
        scores = self.scored(self.remaining)
        order = [g for g in paper_order(self.remaining, scores) if scores[g.name] != INF]
        while order and self.reduction() < self.target:
            g = self.choose(order)
            if g is None:
                break
            order.remove(g)
            self.prune(g, scores[g.name])


class Shared(Schedule):
    """One shot, one ranking of every group by score per parameter removed toward the target."""

    name = "shared"

    def select(self) -> None:
        scores = self.scored(self.remaining)
        pool = [g for g in self.remaining if scores[g.name] != INF]
        while pool and self.reduction() < self.target:
            m = self.missing()
            g = self.choose(sorted(pool, key=lambda g: (_per_param(g, scores[g.name], m), g.name)))
            if g is None:
                break
            pool.remove(g)
            self.prune(g, scores[g.name])


class Rescoring(Schedule):
    """What the re-scoring schedules share: re-score after every prune (all groups, or lazily with
    ``rescore_top``), optionally re-rank by compensated scores (``compensated_top``, with
    ``compensated_windows`` and ``screen``), take `choose`'s group. Subclasses: `slot` (which
    groups a step may take) and `shared` (rank by score per parameter)."""

    rescoring = True
    shared: ClassVar[bool] = False

    def slot(self, live: list[Group], step: int) -> list[Group]:
        """The groups step ``step`` may take among the prunable ``live`` ones."""
        return live

    def key(self, g: Group) -> tuple:
        """Rank of ``g`` by its latest score (lower first; unscored first; a deferred group
        (``defer_nested``) as its sublayer ranks)."""
        if g.name not in self.known and g.name in self.deferred:  # just ahead of its sublayer
            return self.key(self.deferred[g.name])[0], ""
        s = self.known.get(g.name, -INF)
        return (_per_param(g, s, self.m) if self.shared and s != -INF else s), g.name

    def nested(self, live: list[Group]) -> dict[str, Group]:
        """``defer_nested``: each unscored group of ``live`` whose units are a strict part of a
        live, scored and prunable sublayer group -> that sublayer (the deferred groups now)."""
        subs = [h for h in live if h.kind == "sublayer" and self.known.get(h.name, INF) != INF]
        out = {}
        for g in live:
            if g.name not in self.known:
                parent = next((h for h in subs if set(g.units) < set(h.units)), None)
                if parent is not None:
                    out[g.name] = parent
        return out

    def select(self) -> None:
        self.known: dict[str, float] = {}  # latest score of each group, stale after a prune unless re-scored
        self.honest: dict[str, float] = {}  # cross-fitted compensated scores of the screened groups, stale after a prune
        self.deferred: dict[str, Group] = {}  # defer_nested: unscored group -> the sublayer it ranks as
        step = 0
        while self.reduction() < self.target:
            self.m = self.missing()
            live = self.slot([g for g in self.remaining if self.prunable(g)], step)
            pool = live  # every group the step may take (the lazy re-scoring narrows live to the fresh ones)
            live = [g for g in self.rescore(live) if self.known[g.name] != INF]
            ordered = sorted(live, key=self.key)
            if self.every:
                g = self.take_compensated(ordered, live)
            elif self.compensated_top:
                g = self.take_reranked(ordered, pool)
            else:
                g = self.choose(ordered)
            if g is None:
                break
            self.prune(g, self.known[g.name])
            step += 1

    def rescore(self, live: list[Group]) -> list[Group]:
        """Score ``live`` on the current model into ``known``: all of it, or (``rescore_top``) the
        unscored groups then best-first until a fresh score is no worse than every stale one; the
        groups a lazy step may take (the fresh ones, else all)."""
        known = self.known
        if not self.rescore_top:
            known.update(self.scored(live))
            return live
        fresh = [g for g in live if g.name not in known]
        if self.defer_nested:  # the sublayers first, then what is nested in a scored one waits
            known.update(self.scored([g for g in fresh if g.kind == "sublayer"]))
            self.deferred = self.nested(live)
            fresh = [g for g in fresh if g.name not in known and g.name not in self.deferred] + \
                [g for g in fresh if g.kind == "sublayer"]
        known.update(self.scored([g for g in fresh if g.name not in known]))
        fresh = {g.name for g in fresh}
        lazily(live, fresh, self.key, lambda g: known.update(self.scored([g])), self.rescore_top,
               admits=lambda g: known[g.name] != INF)
        return [g for g in live if g.name in fresh and known[g.name] != INF] or \
            [g for g in live if g.name in known]

    def runs(self) -> list[Group]:
        """The runs of blocks (and blocks next to removed runs) the compensated ranking adds now."""
        return closest_windows(self.remaining, self.compensator.states, self.compensated_windows, self.prunable) \
            if self.compensated_windows >= 2 else []

    def take_compensated(self, ordered: list[Group], live: list[Group]) -> Group | None:
        """``compensated_top="all"``: the scores are compensated already; runs of blocks change with every prune."""
        known = self.known
        wins = [w for w in self.runs() if w not in live]
        known.update(self.scored(wins))
        g = self.choose(sorted(ordered + [w for w in wins if known[w.name] != INF], key=self.key))
        for w in wins:  # windows not taken are forgotten; a block's fresh score is kept
            if w.kind == "window" and (g is None or w.name != g.name):
                known.pop(w.name)
        return g

    def take_reranked(self, ordered: list[Group], pool: list[Group]) -> Group | None:
        """The best ``compensated_top`` (and the runs of blocks), re-ranked by what they cost once
        the refit that follows them is made; with ``screen``, every other group of ``pool`` too, by
        its cross-fitted compensated score."""
        known = self.known
        top = ordered[:self.compensated_top]
        t0 = time.perf_counter()
        top += [w for w in self.runs() if w not in top]
        comp = self.scorer.score_compensated(self.pruner, top, self.compensator)
        self.out.scoring_seconds += time.perf_counter() - t0
        plain = {t.name: known[t.name] for t in top if t.name in known}
        known.update(comp)
        rest = [g for g in ordered if g not in top]
        if self.screen:  # every other live group, by its cross-fitted compensated score
            cut = min((self.key(t) for t in top if known[t.name] != INF), default=None)
            extra = [g for g in self.screened([g for g in pool if g not in top], cut) if self.honest[g.name] != INF]
            plain.update({g.name: known[g.name] for g in extra if g.name in known})
            known.update({g.name: self.honest[g.name] for g in extra})
            top += extra
            rest = [g for g in rest if g not in extra]
        g = self.choose(sorted(top, key=self.key) + rest)
        for t in top:  # lazy ranks stay plain; windows not taken are forgotten
            if g is None or t.name != g.name:
                known.pop(t.name, None)
        known.update({n: v for n, v in plain.items() if g is None or n != g.name})
        return g

    def screened(self, outside: list[Group], cut: tuple | None) -> list[Group]:
        """The groups of ``outside`` with a fresh cross-fitted compensated score this step: every
        group never scored, then the best stale ones while they rank above ``cut``."""
        honest, compensator = self.honest, self.compensator

        def hkey(g: Group) -> tuple:
            return _per_param(g, honest[g.name], self.m), g.name

        def trials(gs: list[Group]) -> None:
            if not gs:
                return
            t0, was = time.perf_counter(), compensator.cross_fit
            compensator.cross_fit = True
            try:
                honest.update(self.scorer.score_compensated(self.pruner, gs, compensator))
            finally:
                compensator.cross_fit = was
                self.out.scoring_seconds += time.perf_counter() - t0

        new = [g for g in outside if g.name not in honest]
        trials(new)
        fresh = {g.name for g in new}
        lazily(outside, fresh, hkey, lambda g: trials([g]), self.rescore_top or len(outside), cut=cut)
        return [g for g in outside if g.name in fresh]


class Iterative(Rescoring):
    """Algorithm 9 (CNNs; for LLMs the thesis's open re-scoring): re-score after every prune, Algorithm 8's slot rule."""

    name = "iterative"

    def slot(self, live: list[Group], step: int) -> list[Group]:
        mha = [g for g in live if g.mha]
        other = [g for g in live if not g.mha]
        return (mha if step % 3 == 1 else other) if mha and other else live


class SharedIterative(Rescoring):
    """`Shared`'s ranking per parameter, re-scored after every prune."""

    name = "shared-iterative"
    shared = True


class Window(Schedule):
    """Gromov et al. (block granularity, a distance of `WINDOW_SCORES`): the contiguous window of
    ``n`` blocks whose first input is closest to its last output, ``n`` the fewest blocks reaching
    the target."""

    name = "window"

    def select(self) -> None:
        scorer, groups = self.scorer, self.remaining
        if not isinstance(scorer, AngularScorer) or any(g.kind != "block" for g in groups):
            raise UserError("the window schedule (Gromov et al.) needs --granularity block and --score angular-last "
                            "(Gromov's distance at the last token), angular or bi")
        if self.budget.name != "params":
            raise UserError(f"the window schedule (Gromov et al.) counts parameters; use --budget params with it, not "
                            f"{self.budget.name}")
        by_block = {g.block: g for g in groups}
        n_blocks = len(scorer.blocks)
        # parameters each block removes, measured on the dense model
        for g in groups:
            with self.pruner.trial(g.units) as steps:
                g.params = sum(s.params_removed for s in steps)
        for n in range(1, n_blocks):
            starts = [s for s in range(n_blocks - n + 1) if all(b in by_block for b in range(s, s + n))]
            best = None
            for s in starts:
                if sum(by_block[b].params for b in range(s, s + n)) >= self.target * self.before:
                    d = scorer.block_distance(s, n)
                    if best is None or d < best[0]:
                        best = (d, s)
            if best is not None:
                d, s = best
                for b in range(s, s + n):
                    self.prune(by_block[b], d)
                return
        raise UserError("no window of blocks reaches the target")


#: every schedule by name (`depthprune prune --schedule`)
SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (Paper, Iterative, Shared, SharedIterative, Window)}


def make_schedule(name: str, **options) -> Schedule:
    """The schedule called ``name`` with ``options`` (see `Schedule`)."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](**options)
