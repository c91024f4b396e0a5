"""Whether a model spec can be loaded, answered without loading anything heavy: the spec's form,
the file it names (exists, looks intact: safetensors and GGUF headers), whether it runs code
(pickled checkpoints, Hugging Face ``auto_map``), and, for a hub id, the local cache first and
then one bounded request. `depthprune.adapters.load.load_model` calls `check_spec` first; the CLI
calls it before any long work."""
from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
import threading

from ..errors import SpecError
from ..integrity import check_gguf, check_safetensors
from .packaged import PACKAGED_DETECTORS, is_detector_dir


SPEC_HELP = ("use smollm2-135m, random-llama[:N], yolov5n-synth, a Hugging Face directory or hub id, a .gguf "
             "file, an ultralytics .yaml/.pt or detector directory, or python:MODULE:CALLABLE")


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
    if is_gguf(spec):
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
def is_gguf(spec: str) -> bool:
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
