"""Model specs to modules: the only architecture-aware entry point.

Specs: ``smollm2-135m`` (packaged real model), ``random-llama[:LAYERS]`` (tiny random Llama),
a Hugging Face directory or hub id, a ``.gguf`` file, an ultralytics ``.yaml``/``.pt``,
``yolov5n-synth`` (packaged detector trained here) or a detector directory (YAML + safetensors), and
``python:MODULE:CALLABLE`` (the callable returns a module, or a module and example inputs).

`check_spec` answers, without loading anything heavy, whether a spec can be loaded (the file
exists and looks intact, a checkpoint is trusted, a Hugging Face config that ships its own code
is trusted); `load_model` calls it first. A spec that is no existing path but reads as a hub id
is looked up offline first (the local Hugging Face cache), then with one bounded request.
"""
from __future__ import annotations

import importlib
import json
import mmap
import os
import re
import stat
import struct
import threading
from pathlib import Path

from ..errors import SpecError, UserError
from ..integrity import check_gguf, check_safetensors
from ..placement import DEFAULT as DEFAULT_PLACEMENT
from ..placement import Placement, input_device, place, to_device
from .base import LoadedModel
from .packaged import PACKAGED_DETECTORS, is_detector_dir

__all__ = ["LoadedModel", "build_base", "calibration", "check_spec", "context_length", "describe_base", "load_model",
           "write_base_files"]

SPEC_HELP = ("use smollm2-135m, random-llama[:N], yolov5n-synth, a Hugging Face directory or hub id, a .gguf "
             "file, an ultralytics .yaml/.pt or detector directory, or python:MODULE:CALLABLE")


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


#: A Hugging Face hub id: ``namespace/name`` of word characters, '-' and '.' (no '--' or '..').
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}", re.ASCII)


def _is_hub_id(spec: str) -> bool:
    """Whether ``spec`` (not an existing path) can be read as a hub id."""
    return (_HUB_ID.fullmatch(spec) is not None and "--" not in spec and ".." not in spec
            and not spec.endswith((".", "-")) and not os.path.exists(spec))


def _only_a_path(spec: str) -> bool:
    """A spec that can only name a file or directory: ``./x``, ``../x``, ``/x``, ``~/x``, more than
    one separator, a trailing separator, or a name with a separator that no hub id could have."""
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return (spec.startswith((".", "/", "~") + seps) or spec.endswith(seps) or spec.count("/") > 1
            or (os.altsep is not None and os.sep in spec) or ("/" in spec and not _is_hub_id(spec)))


def check_spec(spec: str, trust_checkpoint: bool = False, trust_code: bool = False) -> None:
    """Raise `SpecError` (one line) when ``spec`` cannot be a loadable model: a missing file, a
    file that is not what its name says, a directory without ``config.json`` or with a damaged
    weights file, a Hugging Face directory whose config asks to run its own code (``auto_map``
    with a model type transformers has no class for) without ``trust_code``, a depthprune output
    directory where a base model is needed, an untrusted ``.pt``, a hub id that is neither in the
    local Hugging Face cache nor on a hub that answers. Cheap: reads headers only; a hub id not in
    the cache costs one request of a few seconds at most (none when HF_HUB_OFFLINE is set)."""
    if not spec or not spec.strip():
        raise SpecError(f"empty model spec; {SPEC_HELP}")
    if spec in ("smollm2-135m", "random-llama") or spec.startswith("random-llama:"):
        if spec.startswith("random-llama:"):
            layers = spec.split(":", 1)[1]
            if not layers.isdigit() or not 1 <= int(layers) <= 64:
                raise SpecError(f"random-llama:LAYERS needs a layer count from 1 to 64, got {layers!r}")
        return
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SpecError(f"python spec must be python:MODULE:CALLABLE, got {spec!r}")
        return
    if spec.endswith(".pt"):
        if not os.path.isfile(spec):
            raise SpecError(f"no such checkpoint: {spec}")
        if not trust_checkpoint:
            raise SpecError(f"{spec} is a pickled checkpoint (loading it can run code); pass --trust-checkpoint "
                            "only if you trust its source")
        return
    if spec.endswith((".yaml", ".yml")):
        if (os.sep in spec or os.path.exists(spec)) and not os.path.isfile(spec):
            raise SpecError(f"no such model YAML: {spec}")
        return
    if _is_gguf(spec):
        check_gguf_file(spec)
        return
    if spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        return
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "plan.json")):
            raise SpecError(f"{spec} is a depthprune output directory; this command needs a base model (the "
                            "directory's plan.json names its base); `sparsify` reads output directories")
        cfg_path = os.path.join(spec, "config.json")
        if not os.path.lexists(cfg_path):
            raise SpecError(f"{spec} is a directory without config.json (not a Hugging Face model)")
        check_remote_code(read_config(cfg_path), spec, trust_code)
        for name in sorted(os.listdir(spec)):
            if name.endswith(".safetensors"):
                check_safetensors(os.path.join(spec, name), fix="download or convert the model again")
        return
    if os.path.exists(spec):
        raise SpecError(f"{spec} is a file depthprune cannot load as a model; {SPEC_HELP}")
    if _only_a_path(spec):
        raise SpecError(f"{spec}: no such file or directory")
    if _is_hub_id(spec):
        check_hub_id(spec)
        return
    raise SpecError(f"unknown model spec {spec!r}: {SPEC_HELP}")


# --------------------------------------------------------------------------- Hugging Face configs
#: The largest config.json read (real ones are kilobytes; never /dev/zero read until memory runs out).
MAX_CONFIG_BYTES = 16 * 2**20


def read_config(path: str) -> dict:
    """The JSON object in a model directory's ``config.json``: a regular file of bounded size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SpecError(f"{path} is missing (a dangling link?); restore the model's config.json") from None
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SpecError(f"{path} is not a regular file; restore the model's config.json")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_CONFIG_BYTES:
            raise SpecError(f"{path} is {st.st_size:,d} bytes, more than a model configuration has "
                            f"({MAX_CONFIG_BYTES:,d} at most); restore the model's config.json")
        try:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise SpecError(f"cannot read {path}: {e.strerror}") from None
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path} is not a JSON object; restore the model's config.json")
    return cfg


def check_remote_code(cfg: dict, where: str, trust_code: bool = False) -> None:
    """Refuse a Hugging Face configuration that can only be loaded by running code shipped with
    the model (``auto_map`` and a ``model_type`` transformers has no class for) unless
    ``trust_code``. With a model type transformers knows, its own class is loaded and the
    shipped code is never run (``trust_remote_code=False``)."""
    auto_map = cfg.get("auto_map")
    if trust_code or not auto_map:
        return
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type and _transformers_knows(model_type):
        return
    files = sorted({str(v).split(".", 1)[0] + ".py" for v in _auto_map_targets(auto_map)})
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "") if files else "its auto_map"
    raise SpecError(f"{where}: its config.json asks to run code that comes with the model ({shown}) for model type "
                    f"{model_type!r}, which transformers has no class for; pass --trust-code only if you trust "
                    "that code")


def _auto_map_targets(auto_map) -> list[str]:
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    out = []
    for v in values:
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, str) and x:
                out.append(x.split("--")[-1])  # "repo--module.Class" names code in another repository
    return out


def _transformers_knows(model_type: str) -> bool:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return model_type in CONFIG_MAPPING


# --------------------------------------------------------------------------- hub ids
#: Seconds a hub id not in the local cache may wait for the hub (one request, no retries).
HUB_TIMEOUT = 5.0
_hub_checked: dict[str, str | None] = {}  # spec -> None (loadable) or why not


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cached(spec: str) -> bool:
    """Whether the local Hugging Face cache holds ``spec``'s config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache is a cache without the model
        return False


def check_hub_id(spec: str) -> None:
    """A spec that is no existing path and reads as a hub id: in the local cache, or on the hub
    (asked once, :data:`HUB_TIMEOUT` seconds at most); else one `SpecError` naming both readings."""
    if spec not in _hub_checked:
        _hub_checked[spec] = _why_not_on_hub(spec)
    why = _hub_checked[spec]
    if why is not None:
        raise SpecError(f"{spec}: no such file or directory, and {why}")


def _why_not_on_hub(spec: str) -> str | None:
    if hub_cached(spec):
        return None
    if hub_offline():
        return ("no Hugging Face hub model of that name is in the local cache (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE "
                "is set)")
    from huggingface_hub import HfApi  # imported here: a thread left waiting must not hold an import lock
    answer: list = []

    def ask() -> None:
        try:
            HfApi().model_info(spec, timeout=HUB_TIMEOUT)
            answer.append(None)
        except Exception as e:  # noqa: BLE001 - any failure is an answer
            answer.append(e)

    t = threading.Thread(target=ask, name="depthprune-hub-check", daemon=True)
    t.start()
    t.join(HUB_TIMEOUT)
    if not answer:
        return f"no Hugging Face hub id of that name could be reached in {HUB_TIMEOUT:g} s (offline?)"
    e = answer[0]
    if e is None:
        return None
    name = type(e).__name__
    if name == "GatedRepoError":  # exists; access is the download's concern
        return None
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return "no Hugging Face hub model of that name exists (or it is private and you are not logged in)"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return f"the Hugging Face hub answered HTTP {status} for that name"
    return "no Hugging Face hub id of that name could be reached (offline?)"


# --------------------------------------------------------------------------- GGUF files
def _is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


#: ggml tensor types: (elements per block, bytes per block), for the end-of-data check.
_GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
               16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
               22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
               29: (256, 56), 30: (1, 2)}
#: GGUF metadata value types of fixed width (u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64).
_GGUF_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf_file(spec: str) -> None:
    """A ``.gguf`` spec is a regular file whose header, metadata and tensor table parse and whose
    tensors lie inside the file (reads the metadata only, never the tensor data)."""
    if os.path.isdir(spec):
        raise SpecError(f"{spec} is a directory, not a GGUF file; give the .gguf model file itself")
    try:
        st = os.stat(spec)
    except FileNotFoundError:
        raise SpecError(f"no such GGUF file: {spec}") from None
    except OSError as e:
        raise SpecError(f"cannot read GGUF file {spec}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{spec} is not a regular file (a device, pipe or socket), so not a GGUF file; give the "
                        ".gguf model file")
    check_gguf(spec)
    try:
        with open(spec, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            problem = _gguf_problem(blob, len(blob))
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot read GGUF file {spec}: {getattr(e, 'strerror', None) or e}") from None
    if problem:
        raise SpecError(f"{spec} is not a valid GGUF file ({problem}); download or convert it again")


class _Short(Exception):
    pass


def _gguf_problem(blob, size: int) -> str | None:
    """What is wrong with the GGUF metadata in ``blob`` (None when it parses)."""
    version, n_tensors, n_meta = struct.unpack_from("<IQQ", blob, 4)
    if version == 1:
        return "GGUF version 1, which transformers does not read"
    pos = 24

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Short
        vals = struct.unpack_from(fmt, blob, pos)
        pos += n
        return vals

    def string(what: str) -> str:
        nonlocal pos
        (n,) = take("<Q")
        if n > size - pos:
            raise _Short
        raw = blob[pos:pos + n]
        pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not UTF-8 text") from None

    meta: dict = {}
    try:
        for i in range(n_meta):
            key = string(f"metadata key {i}")
            (kind,) = take("<I")
            if kind in _GGUF_WIDTH:
                pos_before = pos
                if pos + _GGUF_WIDTH[kind] > size:
                    raise _Short
                pos += _GGUF_WIDTH[kind]
                if key == "general.alignment" and kind == 4:
                    meta[key] = struct.unpack_from("<I", blob, pos_before)[0]
            elif kind == 8:
                meta[key] = string(f"metadata value {key!r}")
            elif kind == 9:
                elem, count = take("<IQ")
                if elem in _GGUF_WIDTH:
                    if count * _GGUF_WIDTH[elem] > size - pos:
                        raise _Short
                    pos += count * _GGUF_WIDTH[elem]
                elif elem == 8:
                    if count * 8 > size - pos:
                        raise _Short
                    for _ in range(count):
                        (n,) = take("<Q")
                        if n > size - pos:
                            raise _Short
                        pos += n
                else:
                    return f"metadata {key!r} is an array of unknown type {elem}"
            else:
                return f"metadata {key!r} has unknown value type {kind}"
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            return "its metadata names no general.architecture"
        tensors = []
        for i in range(n_tensors):
            name = string(f"the name of tensor {i}")
            (dims,) = take("<I")
            if not 1 <= dims <= 8:
                return f"tensor {name!r} has {dims} dimensions"
            shape = take(f"<{dims}Q")
            kind, offset = take("<IQ")
            tensors.append((name, shape, kind, offset))
    except _Short:
        return "its metadata runs past the end of the file: truncated"
    except ValueError as e:
        return str(e)
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align < 1:
        return f"general.alignment is {align!r}"
    start = (pos + align - 1) // align * align
    for name, shape, kind, offset in tensors:
        elements = 1
        for d in shape:
            elements *= d
        per, nbytes = _GGML_BLOCK.get(kind, (1, 0))
        end = start + offset + elements // per * nbytes
        if start + offset > size or end > size:
            return f"tensor {name!r} ends at byte {end:,d} of a {size:,d}-byte file: truncated"
    return None


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
        from .hf import load_smollm2
        return load_smollm2(spec, progress=progress, dtype=dtype)
    if spec == "random-llama" or spec.startswith("random-llama:"):
        from .hf import random_llama, wrap
        layers = spec.split(":", 1)[1] if ":" in spec else "2"
        return wrap(random_llama(int(layers)), spec)
    if spec.startswith("python:"):
        return _load_python(spec)
    if spec.endswith((".yaml", ".yml", ".pt")) or spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        from .yolo import load_yolo
        return load_yolo(spec, trust_checkpoint=trust_checkpoint, trust_code=trust_code)
    if _is_gguf(spec):
        from .hf import load_gguf
        return load_gguf(spec, spec, progress)
    from .hf import load_hf
    return load_hf(spec, trust_code=trust_code, dtype=dtype)


def describe_base(lm: LoadedModel) -> dict:
    """The base architecture of ``lm`` as data (no weights), for self-contained directories."""
    if lm.family == "causal_lm":
        from .hf import describe
        return describe(lm.model)
    if lm.family == "yolo":
        from .yolo import describe
        return describe(lm)
    return {"kind": "python", "spec": lm.extra.get("base_spec", lm.spec)}


def build_base(desc: dict, directory: Path, trust_code: bool = False, empty: bool = True) -> LoadedModel:
    """The described base architecture, weights not loaded: empty where the family allows it
    (``empty``), else random; ``directory`` is where it was read from (its tokenizer, messages).
    A ``python:`` base imports and runs the user's code, so it needs ``trust_code``."""
    kind, spec = desc.get("kind"), str(directory)
    if kind == "transformers":
        from .hf import build
        return build(desc, Path(directory), spec, empty)
    if kind == "ultralytics":
        from .yolo import build
        return build(desc, spec, trust_code)
    if kind == "python":
        base = str(desc.get("spec"))
        if not trust_code:
            raise SpecError(f"{directory} was pruned from {base!r}: rebuilding it imports and runs that Python "
                            "code; pass --trust-code only if you trust it")
        lm = _load_python(base)
        lm.extra["base_spec"] = base
        lm.spec = spec
        return lm
    raise SpecError(f"{directory}: unknown base architecture kind {kind!r}")


def write_base_files(lm: LoadedModel, structure: dict, out: Path) -> None:
    """Files a family adds to a model directory (Hugging Face: config, modeling code, tokenizer)."""
    if lm.family == "causal_lm":
        from .hf import write_files
        write_files(lm, structure, out)


def _load_python(spec: str) -> LoadedModel:
    import torch.nn as nn
    _, mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise SpecError(f"cannot import {mod_name!r}: no such module (is its folder on PYTHONPATH?)") from None
        raise SpecError(f"importing {mod_name!r} failed: {_one_line(e)}") from None
    except (Exception, SystemExit) as e:  # the user's module: any error is theirs to fix
        raise SpecError(f"importing {mod_name!r} failed: {_one_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SpecError(f"{mod_name} has no callable {fn_name!r}")
    try:
        out = fn()
    except (Exception, SystemExit) as e:
        raise SpecError(f"{mod_name}.{fn_name}() raised {_one_line(e)}") from None
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if not isinstance(model, nn.Module):
        raise SpecError(f"{mod_name}.{fn_name}() returned {type(model).__name__}, not an nn.Module")
    if inputs is None:
        inputs = getattr(model, "example_inputs", None)
    if inputs is None:
        raise SpecError(f"{mod_name}.{fn_name}() must return (module, example_inputs) "
                        "or a module with an `example_inputs` attribute")
    if not isinstance(inputs, (tuple, list, dict)):
        inputs = (inputs,)
    from .hf import is_hf_model, wrap_user_model
    if is_hf_model(model):  # its forward returns a ModelOutput (and a cache): the HF adapter knows
        return wrap_user_model(model, inputs, spec)
    return LoadedModel(model=model.eval(), example_inputs=inputs, spec=spec, family="generic")


def context_length(lm: LoadedModel) -> int | None:
    """The longest sequence the model accepts (the config's ``max_position_embeddings``, or the
    older names of it), None when unknown."""
    cfg = getattr(lm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len",
                 "context_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


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
    if lm.family == "causal_lm":
        from .text import load_text
        from .tokens import calibration_batches, token_windows, tokenizer_of
        ctx = context_length(lm)
        if ctx is not None and seq_len > ctx:
            raise UserError(f"--seq-len {seq_len} is longer than {lm.spec}'s context of {ctx} tokens; "
                            f"use --seq-len {ctx} or less")
        return calibration_batches(token_windows(tokenizer_of(lm), load_text(text_spec), samples, seq_len),
                                   batch_size)
    if lm.family == "yolo":
        from .yolo import calibration_images
        return calibration_images(samples, lm.example_inputs[0].shape[-1])
    return [lm.example_inputs]
