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
    """``python -m depthprune.cli ARGS`` with `cli_env` (or ``env``)."""
    return subprocess.run([sys.executable, "-m", "depthprune.cli", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


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
