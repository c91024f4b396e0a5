"""Schedules: which group to prune next, until a parameter-reduction target is reached.

- ``paper`` (Algorithm 8, one shot): score once; MHA and non-MHA groups ranked separately and
  taken non-MHA, MHA, non-MHA, non-MHA, MHA, ... (the MHA slot when ``step % 3 == 1``,
  counting from 0); a model without attention groups is simply taken in score order.
- ``iterative`` (Algorithm 9 for CNNs; for LLMs the thesis's open re-scoring): re-score after
  every prune (angular: only the blocks whose inputs changed), same slot rule.
- ``shared``: one shot, one ranking of every group by score per parameter removed toward the
  target (a group counts at most the parameters still missing, so near the target a big group
  is not preferred for parameters that only overshoot).
- ``shared-iterative``: that ranking, re-scored after every prune.
- ``window`` (Gromov et al., block granularity; ``angular-last`` is their distance, measured at
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

from ..depth.engine import DepthPruner, count_params
from ..errors import UserError
from ..progress import progress_bar
from .groups import Group
from .scores import INF, AngularScorer, Scorer, angular_distance, changed_paths

SCHEDULES = ("paper", "iterative", "shared", "shared-iterative", "window")


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
    """Score per parameter the group removes toward the target (``missing`` still to go)."""
    return s / min(g.params, missing) if g.params > 0 else INF


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


def run_schedule(pruner: DepthPruner, scorer: Scorer, groups: list[Group], target: float, schedule: str,
                 progress: bool = True, on_step=None, rescore_top: int = 0, compensator=None,
                 compensated_top: int | str = 0, compensated_windows: int = 0, screen: bool = False) -> Outcome:
    """Prune ``groups`` in the schedule's order until ``target``; ``on_step(reduction)`` is
    called after every pruned group (e.g. to evaluate intermediate targets on the way).

    ``rescore_top`` (re-scoring schedules): 0 re-scores every group after each prune; ``K``
    re-scores lazily, best stale score first, until a fresh score is no worse than every stale
    one or ``K`` groups were re-scored (lazy greedy: exact when a prune never makes another
    group cheaper).

    ``compensator`` (`depthprune.compensate.Compensator`): after every pruned group, refit the
    residual writer of the changed block; the refit is recorded as a ``refit`` operation of the
    group's last step (weights only: it changes no structure).

    ``compensated_top`` (``M``, with ``compensator``, re-scoring schedules): each step re-ranks its
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
    it must win on a score that does not count the refit's fit to the tokens it is measured on."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if rescore_top < 0:
        raise UserError(f"--rescore-top must be 0 (all) or a positive count, got {rescore_top}")
    if not 0 <= target < 1:
        raise UserError(f"--target must be a fraction in [0, 1), got {target}")
    if compensated_top != "all" and not (isinstance(compensated_top, int) and compensated_top >= 0):
        raise UserError(f"--rescore-compensated must be a count or 'all', got {compensated_top!r}")
    every = compensated_top == "all"  # every score is a compensated one
    if compensated_top and (compensator is None or schedule not in ("iterative", "shared-iterative")):
        raise UserError("--rescore-compensated needs compensation and a re-scoring schedule "
                        "(iterative or shared-iterative)")
    if screen and (every or not compensated_top):
        raise UserError("--rescore-outsiders screens the groups outside the compensated re-ranking; it needs "
                        "--rescore-compensated M (a count)")
    if compensated_windows and (compensated_windows < 2 or not compensated_top):
        raise UserError(f"--rescore-windows must be 0 (off) or a run length of at least 2, with --rescore-compensated; "
                        f"got {compensated_windows}")
    out = Outcome(params_before=count_params(pruner.model))
    before = out.params_before
    remaining = list(groups)
    rescoring = schedule in ("iterative", "shared-iterative")
    bar = progress_bar(total=round(100 * target, 2), desc="reduction %", unit="%", enabled=progress,
                       bar_format="{desc}: {n:.2f}/{total:.2f} [{elapsed}] {postfix}")

    def reduction() -> float:
        return (before - count_params(pruner.model)) / before

    def missing() -> float:
        return max(target * before - (before - count_params(pruner.model)), 1.0)

    def prune(g: Group, score: float) -> None:
        t0 = time.perf_counter()
        steps = [pruner.prune(u, score) for u in g.units]
        out.pruning_seconds += time.perf_counter() - t0
        if compensator is not None:
            t0 = time.perf_counter()
            rec = compensator.compensate(changed_paths(steps))
            out.compensation_seconds += time.perf_counter() - t0
            if rec is not None:
                out.compensation.append({"group": g.name, **rec})
                if rec.get("writer") and rec.get("alpha") is not None:
                    steps[-1].ops.append({"op": "refit", "module": rec["writer"], "block": rec["block"],
                                          "alpha": rec["alpha"], "tokens": rec["tokens"]})
        r = reduction()
        out.applied.append({"unit": g.name, "units": g.units, "kind": g.kind, "block": g.block, "score": score,
                            "params_removed": sum(s.params_removed for s in steps), "reduction": r})
        bar.n = round(100 * min(r, target), 2)
        bar.set_postfix_str(f"step {len(out.applied)}: {g.name}", refresh=False)
        bar.refresh()
        if on_step is not None:
            on_step(r)
        for r in [g, *g.extra.get("members", [])]:
            if r in remaining:
                remaining.remove(r)
        if rescoring:  # one-shot schedules never look at a score again
            t0 = time.perf_counter()
            scorer.committed(pruner, g)
            out.scoring_seconds += time.perf_counter() - t0

    def scored(gs: list[Group]) -> dict[str, float]:
        t0 = time.perf_counter()
        s = scorer.score_compensated(pruner, gs, compensator) if every else scorer.score(pruner, gs)
        out.scoring_seconds += time.perf_counter() - t0
        return s

    def prunable(g: Group) -> bool:
        return all(pruner.why_not(u) is None for u in g.units)

    def removes(g: Group) -> int | None:
        """Parameters ``g`` removes from the current model (measured in a trial), None if it cannot now."""
        if not prunable(g):
            return None
        try:
            with pruner.trial(g.units) as steps:
                g.params = sum(s.params_removed for s in steps)
        except UserError:
            return None
        return g.params

    def runs() -> list[Group]:
        """The runs of blocks (and blocks next to removed runs) the compensated ranking adds now."""
        return closest_windows(remaining, compensator.states, compensated_windows, prunable) \
            if compensated_windows >= 2 else []

    def choose(ordered: list[Group]) -> Group | None:
        return choose_next(ordered, removes, target * before - (before - count_params(pruner.model)))

    if target > 0 and schedule == "window":
        _window(pruner, scorer, remaining, target, before, prune)
    elif target > 0 and schedule == "paper":
        scores = scored(remaining)
        order = [g for g in paper_order(remaining, scores) if scores[g.name] != INF]
        while order and reduction() < target:
            g = choose(order)
            if g is None:
                break
            order.remove(g)
            prune(g, scores[g.name])
    elif target > 0 and schedule == "shared":
        scores = scored(remaining)
        pool = [g for g in remaining if scores[g.name] != INF]
        while pool and reduction() < target:
            m = missing()
            g = choose(sorted(pool, key=lambda g: (_per_param(g, scores[g.name], m), g.name)))
            if g is None:
                break
            pool.remove(g)
            prune(g, scores[g.name])
    elif target > 0:
        known: dict[str, float] = {}  # latest score of each group, stale after a prune unless re-scored
        shared = schedule == "shared-iterative"

        def key(g: Group) -> tuple:
            s = known.get(g.name, -INF)
            return (_per_param(g, s, m) if shared and s != -INF else s), g.name

        honest: dict[str, float] = {}  # cross-fitted compensated scores of the screened groups, stale after a prune

        def screened(outside: list[Group], cut: tuple | None) -> list[Group]:
            """The groups of ``outside`` with a fresh cross-fitted compensated score this step: every
            group never scored, then the best stale ones while they rank above ``cut``."""
            def hkey(g: Group) -> tuple:
                return _per_param(g, honest[g.name], m), g.name

            def trials(gs: list[Group]) -> None:
                if not gs:
                    return
                t0, was = time.perf_counter(), compensator.cross_fit
                compensator.cross_fit = True
                try:
                    honest.update(scorer.score_compensated(pruner, gs, compensator))
                finally:
                    compensator.cross_fit = was
                    out.scoring_seconds += time.perf_counter() - t0

            new = [g for g in outside if g.name not in honest]
            trials(new)
            fresh = {g.name for g in new}
            lazily(outside, fresh, hkey, lambda g: trials([g]), rescore_top or len(outside), cut=cut)
            return [g for g in outside if g.name in fresh]

        step = 0
        while reduction() < target:
            m = missing()
            live = [g for g in remaining if prunable(g)]
            if schedule == "iterative":
                mha = [g for g in live if g.mha]
                other = [g for g in live if not g.mha]
                live = (mha if step % 3 == 1 else other) if mha and other else live
            pool = live  # every group the step may take (the lazy re-scoring narrows live to the fresh ones)
            if not rescore_top:
                known.update(scored(live))
            else:  # lazy: re-score best-first until a fresh score is no worse than every stale one
                fresh = [g for g in live if g.name not in known]
                known.update(scored(fresh))
                fresh = {g.name for g in fresh}
                lazily(live, fresh, key, lambda g: known.update(scored([g])), rescore_top,
                       admits=lambda g: known[g.name] != INF)
                live = [g for g in live if g.name in fresh and known[g.name] != INF] or live
            live = [g for g in live if known[g.name] != INF]
            ordered = sorted(live, key=key)
            if every:  # the scores are compensated already; runs of blocks change with every prune
                wins = [w for w in runs() if w not in live]
                known.update(scored(wins))
                g = choose(sorted(ordered + [w for w in wins if known[w.name] != INF], key=key))
                for w in wins:  # windows not taken are forgotten; a block's fresh score is kept
                    if w.kind == "window" and (g is None or w.name != g.name):
                        known.pop(w.name)
            elif compensated_top:
                # the best few, re-ranked by what they cost once the refit that follows them is made
                top = ordered[:compensated_top]
                t0 = time.perf_counter()
                top += [w for w in runs() if w not in top]
                comp = scorer.score_compensated(pruner, top, compensator)
                out.scoring_seconds += time.perf_counter() - t0
                plain = {t.name: known[t.name] for t in top if t.name in known}
                known.update(comp)
                rest = [g for g in ordered if g not in top]
                if screen:  # every other live group, by its cross-fitted compensated score
                    cut = min((key(t) for t in top if known[t.name] != INF), default=None)
                    extra = [g for g in screened([g for g in pool if g not in top], cut) if honest[g.name] != INF]
                    plain.update({g.name: known[g.name] for g in extra if g.name in known})
                    known.update({g.name: honest[g.name] for g in extra})
                    top += extra
                    rest = [g for g in rest if g not in extra]
                g = choose(sorted(top, key=key) + rest)
                for t in top:  # lazy ranks stay plain; windows not taken are forgotten
                    if g is None or t.name != g.name:
                        known.pop(t.name, None)
                known.update({n: v for n, v in plain.items() if g is None or n != g.name})
            else:
                g = choose(ordered)
            if g is None:
                break
            prune(g, known[g.name])
            step += 1
    bar.close()
    out.params_after = count_params(pruner.model)
    out.reached = reduction() >= target
    return out


def _window(pruner, scorer, groups, target, before, prune) -> None:
    if not isinstance(scorer, AngularScorer) or any(g.kind != "block" for g in groups):
        raise UserError("the window schedule (Gromov et al.) needs --granularity block and --score angular-last "
                        "(Gromov's distance at the last token), angular or bi")
    by_block = {g.block: g for g in groups}
    n_blocks = len(scorer.blocks)
    # parameters each block removes, measured on the dense model
    for g in groups:
        with pruner.trial(g.units) as steps:
            g.params = sum(s.params_removed for s in steps)
    for n in range(1, n_blocks):
        starts = [s for s in range(n_blocks - n + 1) if all(b in by_block for b in range(s, s + n))]
        best = None
        for s in starts:
            if sum(by_block[b].params for b in range(s, s + n)) >= target * before:
                d = scorer.block_distance(s, n)
                if best is None or d < best[0]:
                    best = (d, s)
        if best is not None:
            d, s = best
            for b in range(s, s + n):
                prune(by_block[b], d)
            return
    raise UserError("no window of blocks reaches the target")
