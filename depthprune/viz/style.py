"""Colours and line styles shared by every picture: one place to change the look.

Node *class* (kind) sets the colour, node *state* the fill and outline, so a pruned node keeps
the colour of what it was and still reads as pruned.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def picture_path(out: str | os.PathLike, what: str) -> Path:
    """``out`` as a picture file: a .png or .svg name in an existing directory (`UserError`
    naming ``what`` otherwise)."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise UserError(f"{what} written as .png or .svg, not {out.suffix!r}")
    if not out.parent.is_dir():
        raise UserError(f"directory {out.parent} does not exist")
    return out

#: Kinds as drawn. ``block`` is a collapsed repeated block, ``external`` a node outside the
#: selected blocks shown only to anchor the edges that leave or enter them.
KIND_COLOURS: dict[str, str] = {
    "transform": "#3b6fb6",
    "activation": "#e07b00",
    "norm": "#2e8b57",
    "arith": "#8e5ea2",
    "concat": "#c2417b",
    "attention": "#c0392b",
    "experts": "#b35900",
    "embedding": "#17808a",
    "other": "#7f7f7f",
    "output": "#a88600",
    "block": "#444444",
    "external": "#9a9a9a",
}
#: Pale fills of the same hues for live nodes (dark text stays readable on them).
KIND_FILLS: dict[str, str] = {
    "transform": "#dce8f7",
    "activation": "#fde6c8",
    "norm": "#d5eedd",
    "arith": "#eadcf0",
    "concat": "#f6d8e5",
    "attention": "#f7d9d5",
    "experts": "#f6e0cc",
    "embedding": "#d3eef0",
    "other": "#ececec",
    "output": "#f5ecc4",
    "block": "#ffffff",
    "external": "#f7f7f7",
}
KIND_LABELS: dict[str, str] = {
    "transform": "transform (T)", "activation": "activation (A)", "norm": "norm (N)",
    "arith": "arithmetic (M)", "concat": "concat (M)", "attention": "attention", "experts": "experts (MoE)",
    "embedding": "embedding",
    "other": "other", "output": "output",
}

STATES = ("live", "identity", "zero", "one", "empty", "neutral")
#: Fill of a node in a pruned state (live nodes use their kind's fill).
STATE_FILLS: dict[str, str] = {"identity": "#ffffff", "zero": "#fff1a8", "one": "#e3f4c4",
                               "empty": "#e6ddf5", "neutral": "#f0f0f0"}
#: Outline: ``solid``, ``dashed`` (identity, neutral M node) or ``dotted`` (neutral operand).
STATE_LINES: dict[str, str] = {"live": "solid", "identity": "dashed", "zero": "dotted", "one": "dotted",
                               "empty": "dotted", "neutral": "dashed"}
#: What a pruned node computes, in the drawing's label.
STATE_TAGS: dict[str, str] = {"identity": "identity", "zero": "Zero operand", "one": "One operand",
                              "empty": "Empty operand", "neutral": "neutral"}
#: Pruning-map cell colours per state (``narrowed``: live but width-pruned; ``absent``: the
#: block has no such node).
MAP_COLOURS: dict[str, str] = {
    "live": "#e8eef6",
    "narrowed": "#a9c7ea",
    "identity": "#b03a2e",
    "zero": "#e67e22",
    "one": "#d4ac0d",
    "empty": "#7d3c98",
    "neutral": "#7f8c8d",
    "absent": "#ffffff",
}
MAP_LABELS: dict[str, str] = {"live": "live", "narrowed": "live, narrowed", "identity": "identity",
                              "zero": "Zero operand", "one": "One operand", "empty": "Empty operand",
                              "neutral": "neutral (M)"}
FONT = "DejaVu Sans"


def gone_colour(share: float) -> str:
    """Fill of a collapsed block: white (nothing gone) to deep red (everything gone)."""
    s = min(max(share, 0.0), 1.0)
    lo, hi = (255, 255, 255), (176, 58, 46)
    r, g, b = (round(a + (c - a) * s) for a, c in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}"


def text_on(fill: str) -> str:
    """Black or white text, whichever reads better on ``fill`` (#rrggbb)."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"
