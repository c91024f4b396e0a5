"""Output directories and files: checked up front, locked, written beside their final place,
moved in when complete, removed when interrupted.

What a user can rely on (see README, "Output directories"):

- ``--out`` is checked before any work: not an existing file (or, for a file output, not a
  directory), its nearest existing ancestor a writable directory, not a symbolic link.
- An existing ``--out`` is replaced only with ``--force``, only when it is itself a depthprune
  output (it holds the marker file `MARKER`, or, written before markers existed, nothing but
  depthprune's own files), only when it holds nothing but what depthprune wrote there (the marker
  lists it; anything a user added, a nested output included, is named and refused), and never
  when it is the current directory, one of its parents, the model being read, a directory
  holding it, or a file inside it.
- A lock (``fcntl.flock`` on the sibling ``.NAME.depthprune-lock``, opened with ``O_NOFOLLOW``: a
  planted link is refused, never followed) makes a second run on the same ``--out`` fail at
  once with a message naming the first run's process id.
- Output is written into a temporary sibling ``.NAME.depthprune-tmp-PID-XXXX`` and renamed into
  place when complete; SIGINT/SIGTERM remove it (the signal handlers are restored afterwards);
  leftovers of a killed run (``kill -9``, power loss) are removed by the next run on that path.
- Files and directories follow the user's umask (``0o666`` / ``0o777`` masked).
- Every temporary name is new (``mkdir`` / ``O_EXCL``), never a fixed name a link could be planted
  on; a full disk, a read-only file system or a name the file system refuses is one `UserError`.
- JSON read from a directory (`read_json_file`) is a regular file of bounded size.

No heavy imports here: the CLI uses this module before it loads torch.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import UserError
from ..integrity import apply_umask, current_umask, read_json_file  # noqa: F401 (re-exported)

#: The file that identifies a depthprune output directory (JSON: tool, format, command, time).
MARKER = ".depthprune"
MARKER_FORMAT = 1
#: What depthprune writes into an output directory (see `is_depthprune_output` for directories
#: written before markers existed).
OUTPUT_FILES = frozenset({"model.safetensors", "plan.json", "report.json", "sparsity.json", MARKER})
#: Names depthprune writes at the top of an output directory, for markers written before the
#: marker listed its files (format 1 without ``files``).
KNOWN_FILES = OUTPUT_FILES | {"report.html", "graph.json", "structure.json", "config.json", "generation_config.json",
                              "modeling_depthprune.py", "tokenizer.json", "tokenizer_config.json",
                              "special_tokens_map.json", "chat_template.jinja", "model.yaml", "meta.json", "data.yaml"}

TMP_TAG = ".depthprune-tmp-"
OLD_TAG = ".depthprune-old-"
LOCK_TAG = ".depthprune-lock"


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives inside `cleanup_on_signals`, so that
    ``finally`` blocks remove temporary output. ``signum`` is the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


# --------------------------------------------------------------------------- recognising outputs
def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a depthprune output directory, or None when ``path`` has none."""
    m = Path(path) / MARKER
    if not m.is_file() or m.is_symlink():
        return None
    try:
        data = read_json_file(m, "marker", limit=1 << 20)
    except UserError:
        return None
    return data if isinstance(data, dict) and data.get("tool") == "depthprune" else None


def is_depthprune_output(path: str | os.PathLike) -> bool:
    """True for a directory depthprune wrote: it holds the marker, or (written before markers
    existed) exactly depthprune's own files: ``model.safetensors``, a ``plan.json`` with a plan's
    keys, and at most ``report.json`` / ``sparsity.json`` besides."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return False
    if read_marker(p) is not None:
        return True
    try:
        names = {e.name for e in p.iterdir()}
        if not ({"plan.json", "model.safetensors"} <= names <= OUTPUT_FILES) or \
                not all((p / n).is_file() and not (p / n).is_symlink() for n in names):
            return False
        plan = read_json_file(p / "plan.json", "plan")
    except (OSError, UserError):
        return False
    return isinstance(plan, dict) and {"format", "base", "fingerprint", "steps"} <= set(plan)


def _listing(root: Path) -> set[str]:
    """Every path below ``root`` (relative, POSIX); directories end in ``/``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            out.add((rel / d).as_posix() + "/")
        for f in filenames:
            out.add((rel / f).as_posix())
    return out


def foreign_files(path: str | os.PathLike) -> list[str]:
    """What a depthprune output directory holds beyond the files depthprune wrote there: the
    names its marker lists (markers without a list: `KNOWN_FILES` at the top level), the report
    a later command rewrites in place, nothing else. Sorted; directories end in ``/``."""
    p = Path(path)
    marker = read_marker(p) or {}
    listed = marker.get("files")
    have = _listing(p)
    if isinstance(listed, list) and all(isinstance(n, str) for n in listed):
        ours = set(listed) | {MARKER, "report.html", "report.json"}
    else:
        ours = KNOWN_FILES
    return sorted(n for n in have if n not in ours)


# --------------------------------------------------------------------------- up-front checks
def _protected_reason(real: Path, protect: Iterable[str | os.PathLike]) -> str | None:
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd:
        return "it is the current directory"
    if real in cwd.parents:
        return "it contains the current directory"
    for spec in protect:
        if not spec or not os.path.exists(spec):
            continue  # a name like random-llama or smollm2-135m, not a path
        held = Path(os.path.realpath(spec))
        if real == held:
            return f"it is the model being read ({spec})"
        if real in held.parents:
            return f"it contains the model being read ({spec})"
        if held in real.parents:
            return f"it is inside the model being read ({spec})"
    return None


def _nearest_existing(p: Path) -> Path:
    a = p.parent
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def check_out(out: str | os.PathLike, force: bool = False, protect: Iterable[str | os.PathLike] = (),
              kind: str = "dir", flag: str = "--out") -> Path:
    """Check an output path before any work; touches nothing. Returns it as an absolute path.

    ``kind`` is ``dir`` (a depthprune output directory) or ``file`` (one file, e.g. a graph).
    ``protect``: paths being read (model specs); ``--force`` never replaces them or a
    directory holding them."""
    if out is None or str(out) == "":
        raise UserError(f"{flag} is empty; give a path")
    p = Path(os.path.abspath(out))
    if p.is_symlink():
        raise UserError(f"{flag} {out} is a symbolic link; give the real path")
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise UserError(f"{flag} {out} is an existing file; give a directory name that does not exist yet")
        if kind == "file" and p.is_dir():
            raise UserError(f"{flag} {out} is a directory; give a file name")
        reason = _protected_reason(Path(os.path.realpath(p)), protect)
        if kind == "dir" and not is_depthprune_output(p):
            raise UserError(f"{flag} {out} exists and is not a depthprune output (no {MARKER} file); "
                            f"choose a new directory (--force replaces only depthprune outputs)")
        if reason is not None:
            raise UserError(f"refusing to write {flag} {out}: {reason}; choose another path")
        if not force:
            raise UserError(f"{flag} {out} exists; pass --force to replace it")
        if kind == "dir":
            extra = foreign_files(p)
            if extra:
                shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                raise UserError(f"--force would remove what depthprune did not write in {flag} {out}: {shown}; "
                                "move it away or choose another path")
    elif kind == "file" and str(out).endswith(os.sep):
        raise UserError(f"{flag} {out} names a directory; give a file name")
    anc = _nearest_existing(p)
    if not anc.is_dir():
        raise UserError(f"cannot create {flag} {out}: {anc} is a file, not a directory")
    with contextlib.suppress(OSError):
        if os.statvfs(anc).f_flag & os.ST_RDONLY:
            raise UserError(f"cannot write {flag} {out}: {anc} is on a read-only file system")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {out}: no write permission in {anc}")
    if p.exists() and not os.access(p.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot replace {flag} {out}: no write permission in {p.parent}")
    return p


# --------------------------------------------------------------------------- signals
@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Inside this block SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt`, so that
    ``finally`` clauses run; previous handlers are restored on exit. Signals the process
    ignores stay ignored; outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated(signum)

    def on_int(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    for sig, handler in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int)):
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM for a few renames that must not be cut in half; a signal that
    arrives meanwhile is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------- lock
class OutLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.depthprune-lock`` beside ``path``.

    The kernel drops the lock when the process dies, so a killed run never blocks the next.
    The lock file is removed on release; acquiring re-checks that the locked file is still the
    one at that path (another run may have removed it in between)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path.parent / f".{path.name}{LOCK_TAG}"
        self.fd: int | None = None

    def acquire(self) -> "OutLock":
        mode = 0o666 & ~current_umask()
        for _ in range(50):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                             mode)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UserError(f"{self.lock_path} is a symbolic link, not depthprune's lock file; remove it "
                                    "and run again") from None
                raise UserError(f"cannot create the lock file {self.lock_path}: {e.strerror}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UserError(f"{self.lock_path} is not a regular file, not depthprune's lock file; remove it "
                                "and run again")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise UserError(f"{self.path} is being written by another depthprune run{self._owner()}; "
                                "wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)  # removed or replaced by its previous holder: lock the new one
        raise UserError(f"cannot lock {self.lock_path}: it keeps changing")

    def _owner(self) -> str:
        try:
            pid = self.lock_path.read_text().strip()
        except OSError:
            return ""
        return f" (process {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.lock_path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.lock_path)  # only the file this lock made
        os.close(self.fd)
        self.fd = None


# --------------------------------------------------------------------------- leftovers
def clean_leftovers(path: Path) -> list[Path]:
    """Remove what killed runs left beside ``path``; call only while holding `OutLock` for it
    (a live run holds that lock while it writes, so every temporary sibling found then is a
    leftover). A moved-aside previous output (``.NAME.depthprune-old-PID``) is put back when
    ``path`` is missing, else removed. Returns what was removed or restored."""
    parent, name = path.parent, path.name
    done = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    legacy = f".{name}.tmp-"
    for e in entries:
        n = e.name
        if n.startswith(f".{name}{TMP_TAG}"):
            _remove(e)
        elif n.startswith(f".{name}{OLD_TAG}"):
            if not path.exists() and is_depthprune_output(e):
                e.rename(path)
            else:
                _remove(e)
        elif n.startswith(legacy) and len(n) == len(legacy) + 8 and e.is_dir() and not e.is_symlink() \
                and {c.name for c in e.iterdir()} <= OUTPUT_FILES:
            _remove(e)  # a mkdtemp sibling left by an earlier depthprune, holding only its own files
        else:
            continue
        done.append(e)
    return done


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --------------------------------------------------------------------------- write failures
_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EFBIG: "the file is larger than the file system (or the process's file-size limit) allows",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.ENAMETOOLONG: "the name is too long",
                 errno.EILSEQ: "the file system refuses the name's characters", errno.ENOTDIR: "a part of the path is a file",
                 errno.EIO: "an input/output error"}


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, in words, when ``e`` is a file-system failure (an `OSError` with a
    known errno, or safetensors' error wrapping one); None for anything else."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _WRITE_ERRNOS[e.errno]
    if isinstance(e, UnicodeEncodeError):
        return "the file system refuses the name's characters"
    text = str(e)
    if type(e).__name__ == "SafetensorError" and ("I/O error" in text or "IoError" in text):
        m = re.search(r"\(os error (\d+)\)|code: (\d+),", text)
        code = int(m.group(1) or m.group(2)) if m else errno.EIO
        return _WRITE_ERRNOS.get(code, "an input/output error")
    return None


@contextlib.contextmanager
def write_failures_as_errors(flag: str, out: Any) -> Iterator[None]:
    """A file-system failure inside the block (`write_failure`) becomes one `UserError` naming
    ``flag`` and ``out``; anything else passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - only file-system failures are turned into a line
        reason = write_failure(e)
        if reason is None:
            raise
        raise UserError(f"cannot write {flag} {_shown(out)}: {reason}") from None


def _shown(path: Any) -> str:
    """A path as text that prints anywhere (undecodable bytes escaped)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- test hook
def fault_hold(point: str) -> None:
    """Fault-injection hook for tests: with ``DEPTHPRUNE_TEST_HOLD=POINT:FILE`` the run creates
    FILE on reaching POINT and waits (at most 120 s) until FILE is removed, so a test can send
    a signal at a known moment. Does nothing otherwise."""
    spec = os.environ.get("DEPTHPRUNE_TEST_HOLD", "")
    if not spec.startswith(point + ":"):
        return
    flag = Path(spec.split(":", 1)[1])
    flag.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while flag.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# --------------------------------------------------------------------------- the output directory
class OutputDir:
    """One depthprune output directory being written.

    >>> with OutputDir("out/x", force=False, protect=[model_spec], command="prune") as od:
    ...     ...long work...
    ...     od.write({"plan.json": plan, "report.json": report}, model)
    ...     od.commit()

    The constructor only checks (`check_out`). Entering takes the lock (a second run fails at
    once), removes leftovers of killed runs and creates the temporary sibling ``od.tmp``;
    `commit` writes the marker, fixes modes and moves ``od.tmp`` into place (replacing a
    previous depthprune output under ``--force``). Leaving without commit, by an exception or
    a signal, removes ``od.tmp`` and any parent directories that entering created."""

    def __init__(self, out: str | os.PathLike, force: bool = False, protect: Iterable[str | os.PathLike] = (),
                 command: str = "write", flag: str = "--out", marker: bool = True):
        self.out_arg = out
        self.path = check_out(out, force, protect, "dir", flag)
        self.force, self.protect, self.command, self.flag = force, list(protect), command, flag
        self.marker = marker  # False for files other tools own (exports): no marker, never replaced
        self.tmp: Path | None = None
        self.committed = False
        self._lock = OutLock(self.path)
        self._made_parents: list[Path] = []
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> "OutputDir":
        missing = []
        a = self.path.parent
        while not a.exists():
            missing.append(a)
            a = a.parent
        try:
            for d in reversed(missing):
                os.mkdir(d)  # mode 0o777 & ~umask
                self._made_parents.append(d)
            self._lock.acquire()
        except OSError as e:
            self._remove_made_parents()
            raise self._refused(e) from None
        except BaseException:
            self._remove_made_parents()
            raise
        self._signals = contextlib.ExitStack()
        try:
            self._signals.enter_context(cleanup_on_signals())
            clean_leftovers(self.path)
            # a run killed while replacing may have put its previous output back: check again
            check_out(self.path, self.force, self.protect, "dir", self.flag)
            tmp = self.path.parent / f".{self.path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            os.mkdir(tmp)  # fails on anything already there, a planted link included
            self.tmp = tmp
        except OSError as e:
            self._close()
            raise self._refused(e) from None
        except BaseException:
            self._close()
            raise
        return self

    def _refused(self, e: OSError) -> UserError:
        return UserError(f"cannot write {self.flag} {_shown(self.out_arg)}: {write_failure(e) or e.strerror}")

    def write(self, files: dict[str, Any], model: Any = None,
              write_model: Callable[[Path], None] | None = None) -> None:
        """Write ``files`` (name -> str, or anything JSON-able) and, when given, the model's
        weights as ``model.safetensors`` into the temporary directory; ``write_model(dir)``
        instead writes the model's files itself (a self-contained directory:
        `depthprune.io.self_contained.write_model_files`). A write the file system refuses
        (full, read-only) is one `UserError`; nothing is left behind."""
        if self.tmp is None:
            raise RuntimeError("OutputDir.write outside its `with` block")
        for name in files:
            if "/" in name or name in ("", ".", "..", MARKER):
                raise ValueError(f"bad output file name {name!r}")
        with self.writing():
            if write_model is not None:
                write_model(self.tmp)
                fault_hold("write")
            elif model is not None:
                from safetensors.torch import save_model
                save_model(model, str(self.tmp / "model.safetensors"))
                fault_hold("write")
            for name, content in files.items():
                text = content if isinstance(content, str) else json.dumps(content, indent=1)
                (self.tmp / name).write_text(text, encoding="utf-8", errors="surrogateescape")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A block that writes into ``self.tmp``: a file-system failure inside (disk full, quota,
        read-only, a name the file system refuses) becomes one `UserError` naming ``--out``."""
        with write_failures_as_errors(self.flag, self.out_arg):
            yield self.tmp

    def commit(self) -> Path:
        """Move the complete output into place; returns its path."""
        if self.tmp is None or self.committed:
            raise RuntimeError("OutputDir.commit twice or outside its `with` block")
        marker = {"tool": "depthprune", "format": MARKER_FORMAT, "command": self.command,
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": sorted(_listing(self.tmp))}
        with self.writing():
            if self.marker:
                (self.tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            apply_umask(self.tmp)
        fault_hold("commit")
        with signals_deferred():
            old = None
            if self.path.exists() or self.path.is_symlink():
                # checked again under the lock: it may have appeared since the up-front check
                check_out(self.path, self.force, self.protect, "dir", self.flag)
                old = self.path.parent / f".{self.path.name}{OLD_TAG}{os.getpid()}"
                os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            self.committed = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.path

    def _remove_made_parents(self) -> None:
        for d in reversed(self._made_parents):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty
        self._made_parents = []

    def _close(self) -> None:
        # signals stay blocked until the handlers are restored: one arriving meanwhile then
        # meets the previous handler, after the clean-up is complete
        with signals_deferred():
            try:
                if not self.committed and self.tmp is not None:
                    shutil.rmtree(self.tmp, ignore_errors=True)
            finally:
                self._lock.release()
                if not self.committed:
                    self._remove_made_parents()
                if self._signals is not None:
                    self._signals.close()
                    self._signals = None

    def __exit__(self, *exc) -> None:
        self._close()


def write_output_dir(out: str | os.PathLike, files: dict[str, Any], model: Any = None, force: bool = False,
                     protect: Iterable[str | os.PathLike] = (), command: str = "write",
                     write_model: Callable[[Path], None] | None = None) -> Path:
    """Write a complete output directory in one go (check, lock, temporary sibling, rename)."""
    with OutputDir(out, force=force, protect=protect, command=command) as od:
        od.write(files, model, write_model)
        return od.commit()


def write_output_file(out: str | os.PathLike, write: Callable[[str], None], force: bool = False,
                      protect: Iterable[str | os.PathLike] = (), flag: str = "--out") -> Path:
    """Write one file through a temporary sibling: it is created new (``O_EXCL``, never through
    a link), ``write(tmp_path)`` fills it, then it is renamed over ``out``. Interrupted or
    failed writes leave nothing behind; a file-system failure is one `UserError`."""
    p = check_out(out, force, protect, "file", flag)
    missing = []
    a = p.parent
    while not a.exists():
        missing.append(a)
        a = a.parent
    handlers = contextlib.ExitStack()
    handlers.enter_context(cleanup_on_signals())
    tmp: Path | None = None
    done = False
    try:
        with write_failures_as_errors(flag, out):
            for d in reversed(missing):
                os.mkdir(d)
            fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}{TMP_TAG}{os.getpid()}-")
            os.close(fd)
            tmp = Path(name)
            write(str(tmp))
            apply_umask(tmp)
            with signals_deferred():
                os.replace(tmp, p)
                done = True
    finally:
        with signals_deferred():
            try:
                if not done:
                    if tmp is not None:
                        with contextlib.suppress(FileNotFoundError):
                            tmp.unlink()
                    for d in missing:
                        with contextlib.suppress(OSError):
                            os.rmdir(d)
            finally:
                handlers.close()
    return p
