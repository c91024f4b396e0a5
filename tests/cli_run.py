"""One way to run the real `depthprune` command in a subprocess, and to see what it changed."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(extra_path: list[str | os.PathLike] = (), **env: str) -> dict:
    """The environment for a CLI subprocess: this checkout first on the path, no bytecode
    written next to user modules, YOLO/matplotlib settings kept out of ``~``."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, extra_path)] +
                                      ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["PYTHONDONTWRITEBYTECODE"] = "1"
    e.setdefault("YOLO_VERBOSE", "False")
    e.update(env)
    return e


def run_cli(args: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m depthprune.cli ARGS`` with `cli_env` (or ``env``): in a fork of this process
    (`forked`) where that is the same run, else in a new interpreter."""
    env = env or cli_env()
    if FORK and _forkable(env):
        return forked(args, cwd, env, timeout)
    return subprocess.run([sys.executable, "-m", "depthprune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- forked runs
# A new interpreter spends 5-15 s importing torch, transformers and ultralytics before the command
# starts; a fork of the test process (which imported them once) starts the command at once. The
# child is made to look like a fresh `python -m depthprune.cli`: its own stdin/stdout/stderr
# file descriptors, the environment and path given, default signal handling, Python's default
# warning filters and display, log records to its own stderr; it ends with `os._exit` (nothing of
# the test process runs in it afterwards). What a fork cannot reproduce goes to a real
# interpreter: a `sitecustomize` on the path (it runs at start-up), or DEPTHPRUNE_TEST_FORK=0.
FORK = os.environ.get("DEPTHPRUNE_TEST_FORK", "1") != "0" and hasattr(os, "fork")
_WARM: list = []


#: environment variables libraries read when imported (here, once, before the fork): a run that
#: sets them otherwise needs its own interpreter
_AT_IMPORT = ("YOLO_", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "MPL", "OMP_", "MKL_", "CUDA_", "XDG_",
              "HOME", "LANG", "LC_", "PYTHON")


def _forkable(env: dict) -> bool:
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if any(Path(p, n).exists() for p in extra for n in ("sitecustomize.py", "usercustomize.py")):
        return False
    keys = {k for k in (*env, *os.environ) if k.startswith(_AT_IMPORT)} - {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE"}
    return all(env.get(k) == os.environ.get(k) for k in keys)


def _warm() -> None:
    """Import once, in this process, what every command imports (the children inherit it)."""
    if not _WARM:
        import depthprune.adapters.load  # noqa: F401  (torch, transformers, the loaders)
        import depthprune.cli.main  # noqa: F401
        _WARM.append(True)


def _child(args: list[str], cwd, env: dict, out: int, err: int) -> int:
    import io
    import locale
    import logging
    import warnings

    for fd, target in ((0, os.open(os.devnull, os.O_RDONLY)), (1, out), (2, err)):
        os.dup2(target, fd)
    enc = locale.getpreferredencoding(False)
    sys.stdin = open(os.devnull, encoding=enc)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=enc)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=enc, errors="backslashreplace",
                                  line_buffering=True)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    sys.argv = [str(REPO / "depthprune" / "cli" / "__main__.py"), *args]
    # warnings as a fresh interpreter shows them (pytest records them in the test process)
    warnings.resetwarnings()
    for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", cat, append=True)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = warnings._showwarning_orig
    warnings._showwarnmsg_impl = lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg))
    # log records: pytest's capturing handlers dropped, stream handlers bound to the test
    # process's stderr write to this one
    for lg in [logging.getLogger(), *[v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger)]]:
        for h in list(lg.handlers):
            if type(h).__module__.startswith("_pytest"):
                lg.removeHandler(h)
            elif isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and not isinstance(getattr(type(h), "stream", None), property):  # a property follows sys.stderr
                h.stream = sys.stderr  # not setStream: it flushes the old stream, maybe a closed capture file
    # torch rebuilds its thread pool, which a fork leaves corrupt, on first use; two threads of
    # the child using it first at once (transformers loads tensors on a thread pool) race on that
    # rebuild ("Invalid thread pool!"), so this thread uses it first
    import torch
    torch.set_num_threads(torch.get_num_threads())
    if cwd is not None:
        os.chdir(cwd)
    from depthprune.cli.main import main
    return main(args)


def forked(args: list[str], cwd, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`run_cli` in a fork of this process (see above); the same CompletedProcess (text, with
    universal newlines as ``text=True`` gives)."""
    import locale
    import tempfile
    import traceback
    import warnings

    _warm()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, use of fork()"
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(args, cwd, env, out.fileno(), err.fileno())
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 0)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["depthprune", *args], timeout)
            time.sleep(0.01)
        code = os.waitstatus_to_exitcode(status)
        enc = locale.getpreferredencoding(False)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(enc).replace("\r\n", "\n").replace("\r", "\n"))
    return subprocess.CompletedProcess(["depthprune", *args], code, texts[0], texts[1])


def start_cli(args: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None) -> subprocess.Popen:
    """The same, started in the background (stdout/stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "depthprune.cli", *args], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)


def held(args: list[str], point: str, flag: Path, cwd: str | os.PathLike | None = None, **env: str) -> subprocess.Popen:
    """Start the CLI with the fault hook at ``point`` (`depthprune.io.outdir.fault_hold`); return
    the process once it is there."""
    p = start_cli(args, cwd=cwd, env=cli_env(DEPTHPRUNE_TEST_HOLD=f"{point}:{flag}", **env))
    deadline = time.monotonic() + 300
    while not flag.exists():
        if p.poll() is not None:
            raise AssertionError(f"exited before {point}: {p.returncode} {p.stderr.read()}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.05)
    return p


def _interruptible() -> None:
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt even
    when the test run itself was started with SIGINT ignored (a background job of a
    non-interactive shell inherits SIG_IGN, and depthprune rightly keeps an ignored SIGINT
    ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snapshot(root: str | os.PathLike) -> dict[str, tuple]:
    """Every path under ``root`` with its type and mode; for files also size, mtime and content
    hash (a directory's own mtime is left out: a lock file made and removed changes it)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        if p.is_dir() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = (True, st.st_mode)
        else:
            out[p.relative_to(root).as_posix()] = (False, st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def assert_one_line_error(r: subprocess.CompletedProcess, contains: str = "") -> None:
    """Exit code 2, exactly one line on stderr, the depthprune error prefix, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    assert r.stderr.startswith("depthprune: error: "), r.stderr
    assert contains in r.stderr, (contains, r.stderr)
