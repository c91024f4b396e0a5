"""Pruning groups: what one schedule step removes, at a chosen granularity.

- ``fine``: one engine unit (a transform, an attention operation or a mixture of experts).
- ``sublayer``: an attention unit alone (or a mixture-of-experts unit), or all candidate
  transforms sharing a parent module (a Llama MLP: gate, up, down), i.e. BlockPruner's
  attention / MLP sublayers.
- ``block``: every candidate unit of one repeated block (removing the Transformer block).
- ``attention``: attention operations only (dropping whole attention sublayers, the unit most
  often redundant in trained decoders; every step keeps the MLPs).
- ``mixed``: fine, sublayer and block groups at once (the fine search space, with sublayers and blocks as
  larger moves); meant for the per-parameter ``shared`` schedules and a global score.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..blocks import block_of, find_blocks
from ..depth.engine import DepthPruner
from ..graph import natural_key
from ..errors import UserError
from .. import layers as K
from ..graph import module_path

GRANULARITIES = ("fine", "sublayer", "block", "attention", "mixed")


@dataclass
class Group:
    name: str
    units: list[str]
    mha: bool = False
    block: int | None = None
    kind: str = "transform"
    params: int = 0  # parameters removed when pruned on the model the scores were taken on
    cost: float = 0.0  # what it removes of the schedule's budget (`depthprune.importance.budget`) there
    extra: dict = field(default_factory=dict)


def make_groups(pruner: DepthPruner, granularity: str = "fine", blocks=None) -> list[Group]:
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    blocks = find_blocks(pruner.model) if blocks is None else blocks
    units = [c.unit for c in pruner.candidates(with_params=False) if c.candidate]
    kind = {u: pruner.g.nodes[u]["kind"] for u in units}
    whole = _whole_blocks(pruner, units, blocks) if blocks else {}
    if granularity != "mixed":
        return _groups(granularity, units, kind, blocks, whole)
    out, seen = [], set()
    whole_ones = any(w is None for w in whole.values())
    for gran in ("fine", "sublayer", "block") if blocks and whole_ones else ("fine", "sublayer"):
        for g in _groups(gran, units, kind, blocks, whole):
            if tuple(g.units) not in seen:
                seen.add(tuple(g.units))
                out.append(g)
    return out


def _whole_blocks(pruner: DepthPruner, units: list[str], blocks) -> dict[int, str | None]:
    """For each block: None when its candidate units hold every weight it has (pruning them all
    removes the block), else a weight they leave (fused expert weights, a router that is not a
    layer, a unit that cannot be pruned). Vectors (norm gains, layer scales) do not count: they
    go with the units or scale nothing once the units are gone."""
    covered = set()
    for u in units:
        covered |= {id(p) for p in pruner.model.get_submodule(module_path(pruner.g.nodes[u]["module"])).parameters()}
    out = {}
    for i, (bp, block) in enumerate(blocks):
        left = next((f"{bp}.{n}" for n, p in block.named_parameters() if p.dim() >= 2 and id(p) not in covered), None)
        out[i] = left
    return out


def _groups(granularity: str, units: list[str], kind: dict, blocks, whole: dict) -> list[Group]:
    if granularity == "attention":
        out = [Group(u, [u], True, block_of(u, blocks), "attention") for u in units if kind[u] == K.ATTENTION]
        if not out:
            raise UserError("attention granularity needs a model with prunable attention operations")
        return out
    if granularity == "fine":
        return [Group(u, [u], kind[u] == K.ATTENTION, block_of(u, blocks), kind[u]) for u in units]
    if granularity == "block":
        if not blocks:
            raise UserError("block granularity needs a model with repeated blocks")
        out = []
        for i, (bp, _) in enumerate(blocks):
            mine = [u for u in units if block_of(u, blocks) == i]
            if mine and whole.get(i) is None:
                out.append(Group(bp, sorted(mine, key=natural_key), False, i, "block"))
        if not out and any(whole.values()):
            left = next(w for w in whole.values() if w)
            raise UserError(f"no block can be removed whole: its prunable units leave weights such as {left} "
                            f"(fused expert weights or layers the engine cannot prune); use --granularity "
                            f"fine, sublayer or mixed")
        return out
    by_parent: dict[str, list[str]] = {}
    out = []
    for u in units:
        if kind[u] in K.COLLAPSED:  # an attention operation, or a mixture of experts: a sublayer alone
            out.append(Group(u, [u], kind[u] == K.ATTENTION, block_of(u, blocks), kind[u]))
        else:
            by_parent.setdefault(u.rsplit(".", 1)[0] if "." in u else u, []).append(u)
    for parent, mine in by_parent.items():
        out.append(Group(parent, sorted(mine, key=natural_key), False, block_of(mine[0], blocks), "sublayer"))
    return sorted(out, key=lambda g: natural_key(g.name))
