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
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..adapters import LoadedModel
from ..io.model_dir import is_model_dir, load_pruned
from ..io import outdir
from . import depthprune_format, hf, nemotron_nas, onnx
from .result import ExportResult

#: format name -> its module: ``plan_export(lm)`` (raises `UserError` when the format cannot
#: express the model) and ``write_export(lm, plan, out) -> ExportResult``; a model's family lists
#: the formats that apply to it (`depthprune.adapters.Family.formats`)
FORMATS = {"hf": hf, "nemotron-nas": nemotron_nas, "onnx": onnx, "depthprune": depthprune_format}


def open_pruned(model_or_dir: Any, trust_checkpoint: bool = False, placement=None):
    """A pruned-model directory, a ``LoadedModel`` or a ``(LoadedModel, DepthPruner)`` pair ->
    ``LoadedModel``."""
    if isinstance(model_or_dir, LoadedModel):
        return model_or_dir
    if isinstance(model_or_dir, tuple) and model_or_dir and isinstance(model_or_dir[0], LoadedModel):
        return model_or_dir[0]
    if isinstance(model_or_dir, (str, os.PathLike)):
        if not is_model_dir(model_or_dir):
            raise UserError(f"{model_or_dir} is not a pruned-model directory (no plan.json; "
                            "make one with `depthprune prune`)")
        lm, _ = load_pruned(model_or_dir, trust_code=trust_checkpoint, placement=placement)
        return lm
    raise TypeError(f"export needs a pruned-model directory or a LoadedModel, not {type(model_or_dir).__name__}")


def check_export_out(out: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
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
    check_export_out(out, protect)
    lm = open_pruned(model_or_dir, trust_checkpoint, placement)
    fits = lm.adapter.formats
    if fmt not in fits:
        raise UserError(f"format {fmt!r} does not apply to a {lm.family} model"
                        + (f"; formats for it: {', '.join(fits)}" if fits else ""))
    module = FORMATS[fmt]
    plan = module.plan_export(lm)  # raises UserError when the format cannot express the model
    with outdir.OutputDir(out, protect=protect, command="export", marker=False) as od:
        with od.writing():
            result = module.write_export(lm, plan, od.tmp)
        od.commit()
    result.out = Path(out)
    return result


__all__ = ["export", "ExportResult", "FORMATS", "open_pruned"]
