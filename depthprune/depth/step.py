"""One applied Prune(f): what the plan records of it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Step:
    """``unit`` pruned (its graph ``kind``), ``params_removed`` by it, the JSON ``ops`` that
    replay it on a fresh base model, and the ``score`` it was chosen by (None: chosen by name)."""

    unit: str
    kind: str
    params_removed: int
    ops: list = field(default_factory=list)
    score: float | None = None

    def as_dict(self) -> dict:
        d = {"unit": self.unit, "kind": self.kind, "params_removed": self.params_removed, "ops": self.ops}
        if self.score is not None:
            d["score"] = self.score
        return d
