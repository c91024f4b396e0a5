"""``depthprune`` format: every state the engine produces (identity, Zero/One/Empty operands, any
width, added biases) as a Hugging Face directory whose own modeling code
(``modeling_depthprune.py``, written by `depthprune.adapters.hf_remote`) rebuilds the pruned
architecture; transformers loads it with ``trust_remote_code=True`` where depthprune is not
installed. The same files are in every output directory of a transformers model; this format
writes them without depthprune's own plan and reports."""
from __future__ import annotations

from pathlib import Path

from ..depth.engine import count_params
from ..io.self_contained import write_model_files
from .result import ExportResult


def plan_export(lm) -> None:
    """Every pruned state is expressible; nothing to decide."""
    return None


def write_export(lm, plan, tmp: Path) -> ExportResult:
    write_model_files(lm, tmp)
    return ExportResult(out=tmp, fmt="depthprune", files=sorted(p.name for p in tmp.iterdir()),
                        notes=["load with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)"],
                        params=count_params(lm.model))
