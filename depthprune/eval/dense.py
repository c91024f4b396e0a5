"""The dense model an output directory was pruned from: its architecture (random weights, for
speed and memory) and, when its spec loads here, its real weights (for quality)."""
from __future__ import annotations

from pathlib import Path

from ..adapters import LoadedModel

from ..adapters.load import build_base, load_model
from ..errors import UserError
from ..integrity import read_json_file


def dense_architecture(spec_or_dir: str, trust_code: bool = False) -> LoadedModel | None:
    """The dense base architecture of an output directory, randomly initialised; None for a spec."""
    p = Path(spec_or_dir)
    if not (p / "structure.json").is_file():
        return None
    structure = read_json_file(p / "structure.json", "structure")
    desc = structure.get("base") if isinstance(structure, dict) else None
    if not isinstance(desc, dict):
        raise UserError(f"{p / 'structure.json'} does not describe a base architecture")
    lm = build_base(desc, p, trust_code, empty=False)
    lm.model.eval()
    return lm


def dense_weights(plan: dict, trust_code: bool = False, placement=None) -> LoadedModel | None:
    """The plan's base model with its real weights, when its spec loads here (else None)."""
    base = plan.get("base")
    if not isinstance(base, str) or (base.startswith("python:") and not trust_code):
        return None
    try:
        return load_model(base, trust_checkpoint=trust_code, trust_code=trust_code, placement=placement)
    except UserError:
        return None
