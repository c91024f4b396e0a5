"""Calibration and evaluation text: ``shakespeare:calib``, ``shakespeare:eval`` or a file path."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import SpecError
from ..integrity import check_text_file
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


TEXT_SPEC_HELP = ("use shakespeare:calib, shakespeare:eval, shakespeare:PLAY, pydoc:reference or a path to a "
                  "UTF-8 text file")
#: Held-out text of another kind than the plays: the Python language and library reference
#: topics that CPython ships for `help()` (technical English prose with code), in key order.
PYDOC_SPEC = "pydoc:reference"


def _pydoc_reference() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data from the standard library
        raise SpecError(f"{PYDOC_SPEC}: this Python has no pydoc_data (the reference topics CPython ships for "
                        "help()); pass a text file instead") from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def check_text_spec(spec: str, flag: str = "--calib") -> None:
    """Raise `SpecError` (one line) when ``spec`` cannot give text: an unknown play, a missing,
    empty, binary or non-UTF-8 file. Reads the file; loads no model."""
    if spec in ("shakespeare:calib", "shakespeare:eval"):
        return
    if spec == PYDOC_SPEC:
        _pydoc_reference()
        return
    if spec.startswith("shakespeare:"):
        name = spec.split(":", 1)[1]
        if not (shakespeare_texts() / f"{name}_gut.txt").is_file():
            raise SpecError(f"{flag}: no play {name!r} in the shakespeare package; {TEXT_SPEC_HELP}")
        return
    if not spec:
        raise SpecError(f"{flag} is empty; {TEXT_SPEC_HELP}")
    if not Path(spec).exists():
        raise SpecError(f"unknown text spec {spec!r} for {flag} (no such file); {TEXT_SPEC_HELP}")
    check_text_file(spec, flag)


def load_text(spec: str) -> str:
    """Resolve a TEXT_SPEC to a string."""
    if spec == "shakespeare:calib":
        return "\n".join(_play(p) for p in CALIB_PLAYS)
    if spec == "shakespeare:eval":
        return _play(EVAL_PLAY)
    if spec == PYDOC_SPEC:
        return _pydoc_reference()
    if spec.startswith("shakespeare:"):
        return _play(spec.split(":", 1)[1])
    if Path(spec).exists():
        return check_text_file(spec)
    raise SpecError(f"unknown text spec {spec!r}: {TEXT_SPEC_HELP}")
