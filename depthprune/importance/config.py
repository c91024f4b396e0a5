"""The selection policy of a prune to a target, one `PruneConfig` for the library and the
command line alike: ``depthprune prune --target`` builds one from its flags, and
`depthprune.importance.prune_to_target` takes one, so both choose the same way.

A field left ``None`` takes its default when the config is `PruneConfig.resolved` on the model:
with none of ``score``/``schedule``/``granularity``/``rescore_top`` given, all four (and the
compensated re-ranking) come as one bundle from the model's recipe (``target_defaults``, or the
``efforts`` entry ``effort`` names); with any of them given, the others are `GENERIC_SELECTION`.
With none given and no bundle, on a model without a chain of repeated blocks (`depthprune.blocks.chained_blocks`)
the score is ``output``, not ``angular``; ``compensate`` is on for a target on models with
next-token logits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..blocks import chained_blocks
from ..errors import UserError
from .budget import BUDGETS
from .schedules import WINDOW_SCORES

#: the selection when neither the config nor the model's recipe says otherwise
GENERIC_SELECTION = {"score": "angular", "schedule": "paper", "granularity": "fine", "rescore_top": 0}

#: the recipe bundles ``effort`` names (balanced, the default, is ``target_defaults``)
EFFORTS = ("fast", "balanced", "best")


def effort_bundle(recipe: dict, effort: str | None) -> dict:
    """The recipe's selection bundle for ``effort`` (balanced, the default, is its
    ``target_defaults``; fast and best its ``efforts``); ``{}`` when the recipe has none."""
    if effort in (None, "balanced"):
        return dict(recipe.get("target_defaults") or {})
    return dict((recipe.get("efforts") or {}).get(effort) or recipe.get("target_defaults") or {})


@dataclass(frozen=True)
class PruneConfig:
    """How `prune_to_target` selects; ``None``: the default (see the module). The command-line
    flag of each field is in its comment."""

    target: float | None = None  # --target: reduction of the budget to reach, in [0, 1)
    score: str | None = None  # --score (`depthprune.importance.SCORES`)
    schedule: str | None = None  # --schedule (`depthprune.importance.SCHEDULES`)
    granularity: str | None = None  # --granularity (`depthprune.importance.GRANULARITIES`)
    rescore_top: int | None = None  # --rescore-top: lazy re-scoring, at most K groups a step (0: all)
    effort: str | None = None  # --effort: the recipe bundle (`EFFORTS`) when no selection field is given
    compensate: bool | None = None  # --compensate / --no-compensate
    compensated_top: int | str | None = None  # --rescore-compensated: a count or "all"
    compensated_windows: int | None = None  # --rescore-windows
    screen: bool | None = None  # --rescore-outsiders
    cross_fit: bool = False  # --cross-fit
    channels: str | None = None  # --channels: taylor (the default) or magnitude
    seed: int = 0  # --seed (of the random score)
    budget: str = "params"  # --budget: what the target counts (`depthprune.importance.budget.BUDGETS`)
    defer_nested: bool | None = None  # --defer-nested: a sublayer's transforms wait for the lazy re-scoring

    @property
    def explicit(self) -> bool:
        """Any of score/schedule/granularity/rescore_top given: the others are then
        `GENERIC_SELECTION`'s, not the recipe's bundle."""
        return any(getattr(self, k) is not None for k in GENERIC_SELECTION)

    @property
    def complete(self) -> bool:
        """Every field that has a default is given (a resolved config): nothing is left to fill."""
        return None not in (self.score, self.schedule, self.granularity, self.rescore_top, self.compensate,
                            self.compensated_top, self.compensated_windows, self.screen, self.channels,
                            self.defer_nested)

    def filled(self, bundle: dict) -> PruneConfig:
        """Each of score/schedule/granularity/rescore_top left out set to ``bundle``'s value, else
        `GENERIC_SELECTION`'s."""
        return dataclasses.replace(self, **{k: bundle.get(k, v) for k, v in GENERIC_SELECTION.items()
                                            if getattr(self, k) is None})

    def check(self) -> None:
        """What can be checked without the model (`depthprune prune` does before loading it):
        ``effort`` is a bundle's name and comes without selection fields, and the fields given
        fit together (`validate`, with the generic selection when one is given)."""
        if self.budget not in BUDGETS:
            raise UserError(f"unknown budget {self.budget!r}; use one of {', '.join(BUDGETS)}")
        if self.effort is not None and self.effort not in EFFORTS:
            raise UserError(f"unknown effort {self.effort!r}; use one of {', '.join(EFFORTS)}")
        if self.effort is not None and self.explicit:
            raise UserError("--effort picks --score/--schedule/--granularity/--rescore-top as one bundle; give "
                            "either --effort or those flags")
        (self.filled({}) if self.explicit else self).validate()

    def validate(self) -> None:
        """The compensated re-ranking has what it re-ranks with (compensation, an output score, a
        re-scoring schedule), and a window schedule whole blocks and a distance."""
        if self.compensated_windows == 1:
            raise UserError("--rescore-windows W: runs of 2 to W whole blocks; give 0 (off) or at least 2")
        if self.cross_fit and self.compensated_top == 0:
            raise UserError("--cross-fit scores the trials of the compensated re-ranking; it needs --rescore-compensated M")
        if self.screen and self.compensated_top in (0, "all"):
            raise UserError("--rescore-outsiders lets the groups outside the compensated re-ranking compete; it needs "
                            "--rescore-compensated M (a count)")
        if self.compensated_windows and self.compensated_top == 0:
            raise UserError("--rescore-windows adds runs of blocks to the compensated re-ranking; it needs "
                            "--rescore-compensated M")
        if self.compensated_top:
            if self.compensate is False:
                raise UserError("--rescore-compensated ranks groups by their score once compensated; it needs "
                                "--compensate")
            if self.score not in (None, "ce", "ppl"):
                raise UserError(f"--rescore-compensated needs --score ce or ppl (an output score), not {self.score}")
            if self.schedule not in (None, "iterative", "shared-iterative"):
                raise UserError(f"--rescore-compensated needs a re-scoring schedule (iterative or shared-iterative), "
                                f"not {self.schedule}")
        if self.defer_nested and (self.rescore_top == 0 or self.schedule not in (None, "iterative", "shared-iterative")):
            raise UserError("--defer-nested lets a sublayer's transforms wait for the lazy re-scoring; it needs "
                            "--rescore-top K (K > 0) and a re-scoring schedule (iterative or shared-iterative)")
        if self.schedule == "window" and self.budget != "params":
            raise UserError(f"the window schedule (Gromov et al.) counts parameters; use --budget params with it, not "
                            f"{self.budget}")
        if self.target is not None and self.schedule == "window" and (self.granularity != "block"
                                                                      or self.score not in WINDOW_SCORES):
            raise UserError("the window schedule (Gromov et al.) needs --granularity block and --score "
                            + " or ".join(WINDOW_SCORES))

    def resolved(self, lm) -> PruneConfig:
        """This config with every default filled for ``lm`` (a `depthprune.adapters.LoadedModel`:
        its ``recipe``, ``model`` and ``logits_fn``), checked; ``effort`` is then the bundle taken
        (None when a selection field was given). A `complete` config (a resolved one) is taken as
        it is, only validated."""
        if self.complete:
            self.validate()
            return self
        self.check()
        explicit = self.explicit
        bundle = {} if explicit else effort_bundle(lm.recipe or {}, self.effort)
        c = self.filled(bundle)
        score = c.score
        # neither a selection field nor the recipe chose the score, and there is nothing to compare
        # block by block: the change of the model's outputs (with any selection field: angular)
        if not explicit and "score" not in bundle and c.target is not None and \
                not chained_blocks(lm.model, getattr(lm, "example_inputs", None), getattr(lm, "forward_fn", None)):
            score = "output"
        compensate = c.compensate
        if compensate is None:
            compensate = bool(bundle.get("compensate", lm.logits_fn is not None)) if c.target is not None else False
        top = c.compensated_top
        if top is None:
            top = bundle.get("rescore_compensated", 0) if compensate else 0
        windows = c.compensated_windows
        if windows is None:
            windows = int(bundle.get("rescore_windows", 0)) if top else 0
        screen = c.screen
        if screen is None:
            screen = bool(bundle.get("rescore_outsiders", False)) and top not in (0, "all")
        defer = c.defer_nested
        if defer is None:
            defer = bool(bundle.get("defer_nested", False)) and bool(c.rescore_top) and \
                c.schedule in ("iterative", "shared-iterative")
        c = dataclasses.replace(c, score=score, effort=None if explicit else (self.effort or "balanced"),
                                compensate=compensate, compensated_top=top, compensated_windows=windows, screen=screen,
                                channels=c.channels or "taylor", defer_nested=defer)
        c.validate()
        return c
