"""``report.json``: what each command did, kept across commands.

The top level holds the keys of the command that wrote the directory, exactly as before
sections existed (for ``prune``: ``params_before``, ``params_after``, ``reduction``, ``units``,
``seconds``, ``score``, ``schedule``, ...; for ``sparsify``: ``method``, ``sparsity``/``pattern``,
``nonzero_before``, ``nonzero_after``, ``seconds``, ``layers``, ...) plus ``"command"``, the name
of that command. Each command's own record is also kept under its name (``report["prune"]``,
``report["sparsify"]``, ``report["eval"]``, ...): a directory made from another one (``sparsify``
of a pruned directory) carries the sections of its input, and a command that adds to a
directory in place (``eval``) adds its section and leaves the top level alone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..integrity import read_json_file
from .outdir import OutLock, is_depthprune_output, write_output_file

REPORT = "report.json"
#: Section names; a report's top-level keys never use them.
COMMANDS = ("prune", "sparsify", "finetune", "demo", "eval", "export")


def read_report(directory: str | os.PathLike) -> dict:
    """The report of an output directory; ``{}`` when it has none. A report that is not a JSON
    object is a `UserError`."""
    p = Path(directory) / REPORT
    if not p.exists() and not p.is_symlink():
        return {}
    data = read_json_file(p, "report")
    if not isinstance(data, dict):
        raise UserError(f"{p} holds a JSON {type(data).__name__}, not an object; delete it or restore it")
    return data


def sections(report: dict) -> dict[str, Any]:
    """Every command's section of ``report``. A report written before sections existed is one
    command's top level: it becomes that command's section (``prune`` when it has
    ``params_before``, ``sparsify`` when it has ``method``)."""
    found = {k: report[k] for k in COMMANDS if isinstance(report.get(k), dict)}
    if not found and "command" not in report:
        if "params_before" in report:
            found["prune"] = dict(report)
        elif "method" in report:
            found["sparsify"] = dict(report)
    return found


def command_report(command: str, data: dict, previous: dict | None = None) -> dict:
    """The report of a directory written by ``command``: ``data`` at the top level and as
    ``report[command]``, with the other sections of ``previous`` (the input's report) kept."""
    if command not in COMMANDS:
        raise ValueError(f"unknown report section {command!r}")
    clash = set(data) & (set(COMMANDS) | {"command"})
    if clash:
        raise ValueError(f"report keys {sorted(clash)} are reserved for sections")
    out = dict(data)
    out["command"] = command
    for name, sec in sections(previous or {}).items():
        if name != command:
            out[name] = sec
    out[command] = dict(data)
    return out


def add_section(report: dict, command: str, data: dict) -> dict:
    """``report`` with ``report[command] = data`` (a command that adds to a directory in place);
    the top level is left as it is."""
    if command not in COMMANDS:
        raise ValueError(f"unknown report section {command!r}")
    out = dict(report)
    for name, sec in sections(report).items():
        out.setdefault(name, sec)
    out[command] = dict(data)
    return out


def update_report(directory: str | os.PathLike, command: str, data: dict) -> Path:
    """Add ``command``'s section to the report of an existing output directory in place: under
    the directory's lock, through a temporary file renamed over ``report.json``."""
    d = Path(os.path.abspath(directory))
    if not is_depthprune_output(d):
        raise UserError(f"{directory} is not a depthprune output directory")
    lock = OutLock(d).acquire()
    try:
        text = json.dumps(add_section(read_report(d), command, data), indent=1)

        def write(tmp: str) -> None:
            Path(tmp).write_text(text, encoding="utf-8")
        return write_output_file(d / REPORT, write, force=True, flag=REPORT)
    finally:
        lock.release()
