"""Calibration and evaluation text: ``shakespeare:calib``, ``shakespeare:eval``, ``shakespeare:PLAY``,
``pydoc:reference`` or a file path; several, comma-separated, are mixed (`text_specs`)."""
from __future__ import annotations

import os
import re
import stat

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
                  "UTF-8 text file (several: comma-separated)")
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


#: The largest text file read (texts are read whole, then tokenized whole).
MAX_TEXT_BYTES = 256 * 2**20

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
          (stat.S_ISSOCK, "a socket"))


def _check_text_path(spec: str, flag: str) -> None:
    """``spec`` names a regular file of at most `MAX_TEXT_BYTES` (or a directory, which
    `check_text_file` refuses by name): never a device, pipe or socket read until memory runs out."""
    try:
        st = os.stat(spec)
    except (FileNotFoundError, NotADirectoryError):
        raise SpecError(f"unknown text spec {spec!r} for {flag} (no such file); {TEXT_SPEC_HELP}") from None
    except OSError as e:
        raise SpecError(f"{flag}: cannot read {spec}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        raise SpecError(f"{flag} {spec} is not a regular file ({kind}); give a UTF-8 text file")
    if st.st_size > MAX_TEXT_BYTES:
        raise SpecError(f"{flag} {spec} is {st.st_size / 2**20:,.0f} MiB; a text is read whole, at most "
                        f"{MAX_TEXT_BYTES // 2**20} MiB: give an excerpt")


def text_specs(spec: str) -> list[str]:
    """The text specs ``spec`` names: several separated by commas (``shakespeare:calib,pydoc:reference``),
    one when it has no comma or is an existing path with a comma in its name."""
    if "," not in spec or os.path.lexists(spec):
        return [spec]
    return [part.strip() for part in spec.split(",")]


def check_text_spec(spec: str, flag: str = "--calib") -> None:
    """Raise `SpecError` (one line) when ``spec`` (one text spec, or several comma-separated)
    cannot give text: an unknown play, a missing, empty, binary or non-UTF-8 file, one that is
    not a regular file or is larger than `MAX_TEXT_BYTES`. Reads the file; loads no model."""
    for one in text_specs(spec):
        _check_one(one, flag)


def _check_one(spec: str, flag: str) -> None:
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
    _check_text_path(spec, flag)
    check_text_file(spec, flag)


def load_text(spec: str, flag: str = "text file") -> str:
    """Resolve a text spec to a string (``flag`` names the option it came from, for messages);
    several comma-separated specs are joined (`load_texts` keeps them apart)."""
    return "\n\n".join(load_texts(spec, flag))


def load_texts(spec: str, flag: str = "text file") -> list[str]:
    """Each text ``spec`` names (`text_specs`), in order."""
    return [_load_one(one, flag) for one in text_specs(spec)]


def _load_one(spec: str, flag: str) -> str:
    if spec == "shakespeare:calib":
        return "\n".join(_play(p) for p in CALIB_PLAYS)
    if spec == "shakespeare:eval":
        return _play(EVAL_PLAY)
    if spec == PYDOC_SPEC:
        return _pydoc_reference()
    if spec.startswith("shakespeare:"):
        return _play(spec.split(":", 1)[1])
    if spec and os.path.lexists(spec):
        _check_text_path(spec, flag)
        return check_text_file(spec, flag)
    raise SpecError(f"unknown text spec {spec!r}: {TEXT_SPEC_HELP}")
