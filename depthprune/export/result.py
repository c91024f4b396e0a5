"""What an export wrote."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportResult:
    """What an export wrote. ``notes``: lines worth telling the user (padding, its cost,
    measured differences); ``extra_params``: parameters the format adds (zero padding)."""

    out: Path
    fmt: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: int = 0
    extra_params: int = 0
