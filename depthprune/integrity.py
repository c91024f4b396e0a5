"""Is this file what it claims to be? Cheap checks of the files depthprune reads, and
checksummed cache entries.

- `check_safetensors`: the header parses and describes exactly the bytes that follow.
- `check_gguf`: the GGUF magic and a complete fixed header.
- `check_text_file`: a regular, non-empty file that decodes as UTF-8 text.
- `read_json_file`: a regular JSON file of bounded size (never ``/dev/zero`` read until memory runs out).
- `apply_umask`: what depthprune writes follows the user's umask (temporary directories are
  made ``0o700`` and some writers use ``0o600``; the final files must not be).
- `cached_dir`: a directory in the user cache (e.g. the packaged GGUF converted to
  safetensors) carries a manifest of its files' sizes and SHA-256; an entry that does not
  match (truncated, edited, half-written) is rebuilt, not trusted.

Every failure is a `UserError` naming the file, what is wrong and what to do. No heavy imports.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat as _stat
import struct
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header
#: The largest JSON file depthprune reads from a directory (a report, plan, structure, graph).
MAX_JSON_BYTES = 256 * 2**20
#: The largest text file depthprune reads whole (calibration and evaluation text).
MAX_TEXT_BYTES = 256 * 2**20
GGUF_MAGIC = b"GGUF"
_GGUF_HEADER = 24  # magic, version (u32), tensor count (u64), metadata count (u64)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        raise UserError(f"no such file: {p}") from None
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from None


def check_safetensors(path: str | os.PathLike, fix: str = "write it again or restore it from a copy") -> dict:
    """Check that ``path`` is a complete safetensors file (reads the header only); returns the
    header's tensors, ``{name: {"dtype", "shape", "data_offsets"}}``."""
    p = Path(path)
    size = _size(p)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{p} is truncated ({size} bytes; not a safetensors file); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise UserError(f"{p} is corrupt or truncated (a {n}-byte header in a {size}-byte file); {fix}")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{p} is corrupt (its header is not JSON; not a safetensors file); {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{p} is corrupt (its header is not a JSON object); {fix}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{p} is corrupt (tensor {name!r} has no valid data offsets); {fix}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UserError(f"{p} is corrupt (tensor {name!r} has no valid shape); {fix}")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end != data:
        what = "truncated" if end > data else "corrupt"
        raise UserError(f"{p} is {what}: its header describes {end} bytes of tensor data, the file holds {data}; "
                        f"{fix}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def check_gguf(path: str | os.PathLike) -> None:
    """Check that ``path`` starts like a GGUF file (magic, version, counts)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such GGUF file: {p}")
    size = _size(p)
    with open(p, "rb") as f:
        head = f.read(_GGUF_HEADER)
    if head[:4] != GGUF_MAGIC:
        raise UserError(f"{p} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
    if len(head) < _GGUF_HEADER:
        raise UserError(f"{p} is truncated ({size} bytes, shorter than a GGUF header); download it again")
    version, tensors, meta = struct.unpack("<IQQ", head[4:])
    if version not in (1, 2, 3) or tensors == 0 or tensors > 1 << 24 or meta > 1 << 24:
        raise UserError(f"{p} is corrupt or truncated (GGUF version {version}, {tensors} tensors, {meta} metadata "
                        "entries); download it again")


def check_text_file(path: str | os.PathLike, flag: str = "text file", limit: int = MAX_TEXT_BYTES) -> str:
    """Read ``path`` as UTF-8 text: a regular file of at most ``limit`` bytes; refuse binary
    files (NUL bytes), bad encodings and empty files. Returns the text."""
    p = Path(path)
    raw = read_bounded(p, flag, limit)
    if b"\0" in raw:
        raise UserError(f"{flag} {p} is a binary file (it holds NUL bytes); give plain UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"{flag} {p} is empty")
    return text




def read_bounded(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of ``path``: a regular file (never a device or pipe read until memory runs out)
    of at most ``limit`` bytes, opened once (no gap between the check and the read)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {p} is a directory; give a file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror}") from None
    st = os.fstat(fd)
    if _stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise UserError(f"{what} {p} is a directory; give a file")
    with os.fdopen(fd, "rb") as f:
        if not _stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {p} is not a regular file (a device, pipe or socket); give a file")
        if st.st_size > limit:
            raise UserError(f"{what} {p} is {st.st_size:,d} bytes, more than the {limit:,d} depthprune reads whole")
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise UserError(f"cannot read {what} {p}: {e.strerror}") from None
    if len(raw) > limit:
        raise UserError(f"{what} {p} grew past {limit:,d} bytes while it was read")
    return raw


def read_json_file(path: str | os.PathLike, what: str = "", limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``: a regular file of at most ``limit`` bytes, UTF-8, valid JSON.
    Anything else is one `UserError` naming the file (``what`` says what it should be)."""
    p = Path(path)
    what = what or p.name
    raw = read_bounded(p, what, limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
        raise UserError(f"{p} is {reason}; restore the {what} from a copy or write it again") from None


def read_json_object(path: str | os.PathLike, what: str) -> dict | None:
    """The JSON object in ``path``, None when there is no such file; a file that is not a JSON
    object of bounded size is a `UserError`."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return None
    data = read_json_file(p, what)
    if not isinstance(data, dict):
        raise UserError(f"{p} holds a JSON {type(data).__name__}, not a {what} object; restore it from a copy "
                        "or write it again")
    return data


# --------------------------------------------------------------------------- modes
def current_umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees a change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything below it) the modes a plain ``open`` /
    ``mkdir`` would have made: ``0o666`` / ``0o777`` without the umask's bits."""
    mask = current_umask()
    p = Path(path)
    entries = [p] + (sorted(p.rglob("*")) if p.is_dir() else [])
    for e in entries:
        if e.is_symlink():
            continue
        os.chmod(e, (0o777 if e.is_dir() else 0o666) & ~mask)


# --------------------------------------------------------------------------- cache entries
MANIFEST = ".depthprune-cache.json"


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def seal(directory: str | os.PathLike) -> dict:
    """Write the manifest of ``directory`` (size, mtime and SHA-256 of every file below it)."""
    d = Path(directory)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            files[p.relative_to(d).as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                  "sha256": _sha256(p)}
    manifest = {"format": 1, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def verify(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` does not match its manifest (None when it does). A file whose size and
    mtime match the manifest is taken as is; any other is hashed again."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "it has no manifest"
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is damaged"
    if not isinstance(files, dict) or not files:
        return "its manifest is damaged"
    changed = {}
    for rel, want in files.items():
        p = d / rel
        try:
            st = p.stat()
        except OSError:
            return f"{rel} is missing"
        if not isinstance(want, dict) or st.st_size != want.get("size"):
            return f"{rel} has {st.st_size} bytes, {want.get('size') if isinstance(want, dict) else '?'} expected"
        if st.st_mtime_ns != want.get("mtime_ns"):
            if _sha256(p) != want.get("sha256"):
                return f"{rel} does not match its checksum"
            changed[rel] = st.st_mtime_ns
    if changed:  # same content, touched: remember the new times so the hash is not redone
        for rel, t in changed.items():
            files[rel]["mtime_ns"] = t
        tmp = d / f".{MANIFEST}.{os.getpid()}-{secrets.token_hex(4)}"
        try:  # a new file renamed over the manifest: never written through a link
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(json.dumps(manifest, indent=1))
            os.replace(tmp, d / MANIFEST)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return None


def cached_dir(target: str | os.PathLike, build: Callable[[Path], None], what: str,
               adopt: Callable[[Path], None] | None = None, log: Callable[[str], None] | None = None) -> Path:
    """A verified cache directory at ``target``, (re)built by ``build(staging_dir)`` when missing
    or damaged, then sealed and moved into place.

    ``adopt(target)`` checks an entry made before manifests existed (raise `UserError` when it
    is not usable); a usable one is sealed as is instead of rebuilt. ``log`` receives one line
    when an entry is rebuilt (default: stderr)."""
    target = Path(target)
    log = log or (lambda line: print(f"depthprune: {line}", file=sys.stderr))
    if target.exists() and not target.is_dir():
        raise UserError(f"cache entry {target} is not a directory; remove it or set DEPTHPRUNE_CACHE to another "
                        "directory")
    if target.is_dir():
        reason = verify(target)
        if reason is None:
            return target
        if reason == "it has no manifest" and adopt is not None:
            try:
                adopt(target)
                seal(target)
                return target
            except UserError as e:
                reason = str(e)
        if not _writable(target.parent):
            raise UserError(f"cache entry {target} is damaged ({reason}) and the cache is not writable; set "
                            "DEPTHPRUNE_CACHE to a writable directory")
        log(f"cache entry {target} is damaged ({reason}); rebuilding {what}")
    staging = target.parent / f".{target.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(staging)
    except OSError as e:
        raise UserError(f"cannot write the depthprune cache {target.parent} ({_why(e)}) to build {what}; set "
                        "DEPTHPRUNE_CACHE to a writable directory") from None
    try:
        build(staging)
        apply_umask(staging)
        seal(staging)
        if target.exists():
            old = target.parent / f".{target.name}.damaged-{os.getpid()}-{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process put a fresh entry in place meanwhile
            if verify(target) is not None:
                raise
    except OSError as e:
        raise UserError(f"cannot write the depthprune cache {target.parent} ({_why(e)}) to build {what}; set "
                        "DEPTHPRUNE_CACHE to a writable directory with free space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _writable(d: Path) -> bool:
    try:
        return os.access(d, os.W_OK | os.X_OK) and not os.statvfs(d).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__
