"""Model specs to modules: `load_model` (every family's loader, chosen by the spec), the base
architecture described and rebuilt, the files a family adds, calibration batches.

Imported on its own (``from depthprune.adapters.load import load_model``) so that the package
itself stays light: `depthprune.adapters.check_spec` answers without importing torch.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SpecError, UserError
from ..placement import DEFAULT as DEFAULT_PLACEMENT
from ..placement import Placement, input_device, place, to_device
from . import generic, hf, yolo
from .base import GENERIC, LoadedModel
from .packaged import PACKAGED_DETECTORS, is_detector_dir
from .spec import check_spec, is_gguf

__all__ = ["build_base", "calibration", "describe_base", "load_model", "write_base_files"]


def load_model(spec: str, trust_checkpoint: bool = False, progress: bool = True,
               trust_code: bool = False, placement: Placement | None = None) -> LoadedModel:
    """Resolve a model spec; raises `SpecError` with a one-line message when it cannot.
    ``progress`` allows a status line on stderr for slow steps (the one-time GGUF conversion);
    ``trust_code`` allows a Hugging Face model whose configuration runs its own code (and a model
    YAML that names code). ``placement``: the device and dtype to put the model on (default: CPU,
    the checkpoint's own dtype); Hugging Face checkpoints are read in that dtype directly."""
    lm = _load_model(spec, trust_checkpoint, progress, trust_code, placement or DEFAULT_PLACEMENT)
    return place(lm, placement or DEFAULT_PLACEMENT)


def _load_model(spec: str, trust_checkpoint: bool, progress: bool, trust_code: bool,
                placement: Placement) -> LoadedModel:
    check_spec(spec, trust_checkpoint, trust_code)
    dtype = placement.torch_dtype()
    if spec == "smollm2-135m":
        return hf.load_smollm2(spec, progress=progress, dtype=dtype)
    if spec == "random-llama" or spec.startswith("random-llama:"):
        layers = spec.split(":", 1)[1] if ":" in spec else "2"
        return hf.wrap(hf.random_llama(int(layers)), spec)
    if spec.startswith("python:"):
        return generic.load_python(spec)
    if spec.endswith((".yaml", ".yml", ".pt")) or spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        return yolo.load_yolo(spec, trust_checkpoint=trust_checkpoint, trust_code=trust_code)
    if is_gguf(spec):
        return hf.load_gguf(spec, spec, progress)
    return hf.load_hf(spec, trust_code=trust_code, dtype=dtype)


def describe_base(lm: LoadedModel) -> dict:
    """The base architecture of ``lm`` as data (no weights), for self-contained directories."""
    return lm.adapter.describe(lm)


#: a described base's ``kind`` -> how to build that architecture again
_BUILDERS = {hf.CAUSAL_LM.base_kind: hf.build, yolo.YOLO.base_kind: yolo.build, GENERIC.base_kind: generic.build}


def build_base(desc: dict, directory: Path, trust_code: bool = False, empty: bool = True) -> LoadedModel:
    """The described base architecture, weights not loaded: empty where the family allows it
    (``empty``), else random; ``directory`` is where it was read from (its tokenizer, messages).
    A ``python:`` base imports and runs the user's code, so it needs ``trust_code``."""
    kind = desc.get("kind")
    if not isinstance(kind, str) or kind not in _BUILDERS:
        raise SpecError(f"{directory}: unknown base architecture kind {kind!r}")
    return _BUILDERS[kind](desc, Path(directory), trust_code, empty)


def write_base_files(lm: LoadedModel, structure: dict, out: Path) -> None:
    """Files a family adds to a model directory (Hugging Face: config, modeling code, tokenizer)."""
    if lm.adapter.write_files is not None:
        lm.adapter.write_files(lm, structure, out)


def calibration(lm: LoadedModel, text_spec: str, samples: int, seq_len: int, batch_size: int = 8) -> list:
    """Calibration batches for ``lm``: text windows for causal LMs (``text_spec``), the images
    ultralytics ships for YOLO (``samples`` of them), ``[example_inputs]`` otherwise; on the
    device the model takes its inputs on."""
    return to_device(_calibration(lm, text_spec, samples, seq_len, batch_size), input_device(lm.model))


def _calibration(lm: LoadedModel, text_spec: str, samples: int, seq_len: int, batch_size: int) -> list:
    if samples < 1:
        raise UserError(f"--calib-samples must be at least 1, got {samples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    return lm.adapter.calibration(lm, text_spec, samples, seq_len, batch_size)
