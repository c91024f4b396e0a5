"""Export a pruned model to formats other tools read.

One entry point, `export(model_or_dir, fmt, out)`, one module per format (like ultralytics'
exporter): ``hf`` (a plain Hugging Face checkpoint: whole decoder blocks removed),
``nemotron-nas`` (DeciLM ``block_configs``: removed attention / MLP sublayers and per-block MLP
widths, read by vLLM, SGLang, TensorRT-LLM, MLX-LM and llama.cpp's converter) and ``onnx``
(ultralytics YOLO models, through ultralytics' own exporter) and ``depthprune`` (every pruned
state, with the project's own modeling code for transformers). A format that cannot express the
model raises `UserError` naming what prevents it, before anything is written. ``out`` must not
exist; the export is written to a temporary sibling and renamed when complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..io import outdir

#: format name -> (module name, families it applies to)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hf": ("hf", ("causal_lm",)),
    "nemotron-nas": ("nemotron_nas", ("causal_lm",)),
    "onnx": ("onnx", ("yolo",)),
    "depthprune": ("depthprune_format", ("causal_lm",)),
}


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


def open_pruned(model_or_dir: Any, trust_checkpoint: bool = False, placement=None):
    """A pruned-model directory, a ``LoadedModel`` or a ``(LoadedModel, DepthPruner)`` pair ->
    ``LoadedModel``."""
    from ..adapters.base import LoadedModel
    if isinstance(model_or_dir, LoadedModel):
        return model_or_dir
    if isinstance(model_or_dir, tuple) and model_or_dir and isinstance(model_or_dir[0], LoadedModel):
        return model_or_dir[0]
    if isinstance(model_or_dir, (str, os.PathLike)):
        from ..depth.plan import is_model_dir, load_pruned
        if not is_model_dir(model_or_dir):
            raise UserError(f"{model_or_dir} is not a pruned-model directory (no plan.json; "
                            "make one with `depthprune prune`)")
        lm, _ = load_pruned(model_or_dir, trust_code=trust_checkpoint, placement=placement)
        return lm
    raise TypeError(f"export needs a pruned-model directory or a LoadedModel, not {type(model_or_dir).__name__}")


def check_out(out: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an existing output path (exports never overwrite), a path under a file, on a
    read-only file system or inside the model being read; touches nothing."""
    if os.path.lexists(out):
        raise UserError(f"{out} exists; exports never overwrite, choose a new --out")
    return outdir.check_out(out, force=False, protect=protect)


def export(model_or_dir: Any, fmt: str, out: str | os.PathLike, trust_checkpoint: bool = False,
           placement=None) -> ExportResult:
    """Export a pruned model to ``fmt`` in the new directory ``out``.

    Args:
        model_or_dir: a pruned-model directory (``depthprune prune --out``), a ``LoadedModel``
            or a ``(LoadedModel, DepthPruner)`` pair (the in-memory pruned model).
        fmt: one of `FORMATS`.
        out: the directory to create; must not exist.
        trust_checkpoint: allow the base model of a directory to run code (a pickled checkpoint,
            a ``python:`` spec).
        placement: a `depthprune.placement.Placement` for a directory (its dtype is the
            export's; default: the dtype the directory was saved in).
    Raises:
        UserError: unknown format, a format that does not apply to the model's family or cannot
            express its pruned structure (nothing is written), an existing ``out``.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    protect = [model_or_dir] if isinstance(model_or_dir, (str, os.PathLike)) else []
    check_out(out, protect)
    lm = open_pruned(model_or_dir, trust_checkpoint, placement)
    module_name, families = FORMATS[fmt]
    if lm.family not in families:
        fits = [f for f, (_, fam) in FORMATS.items() if lm.family in fam]
        raise UserError(f"format {fmt!r} does not apply to a {lm.family} model"
                        + (f"; formats for it: {', '.join(fits)}" if fits else ""))
    import importlib
    module = importlib.import_module(f".{module_name}", __name__)
    plan = module.plan_export(lm)  # raises UserError when the format cannot express the model
    with outdir.OutputDir(out, protect=protect, command="export", marker=False) as od:
        with od.writing():
            result = module.write_export(lm, plan, od.tmp)
        od.commit()
    result.out = Path(out)
    return result


__all__ = ["export", "ExportResult", "FORMATS", "open_pruned"]
