"""Progress on stderr: one place that decides how depthprune's tqdm bars look.

Bars always go to stderr (stdout stays for results, so ``--json`` output parses), show counts,
elapsed and remaining time, and are shown whenever ``enabled`` (the CLI's ``--quiet`` turns them
off), on a terminal or not: a long run writing to a log still says where it is (updates every
10 s there instead of twice a second). Importing this module does not import tqdm.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: float | None = None,
                 enabled: bool = True, leave: bool = False, **kw: Any):
    """A tqdm bar on stderr (a disabled one, which costs nothing, when not ``enabled``)."""
    from tqdm import tqdm
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled, file=sys.stderr, leave=leave,
                dynamic_ncols=tty, mininterval=0.5 if tty else 10.0, **kw)


def status(line: str, enabled: bool = True) -> None:
    """One line on stderr saying what a slow step without a count is doing (loading, converting)."""
    if enabled:
        print(f"depthprune: {line}", file=sys.stderr, flush=True)
