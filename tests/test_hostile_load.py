"""Hostile inputs to model and text loading (issue 31), through the real CLI in a subprocess:
exit code 2, one line on stderr, no traceback, nothing created, and no code run that the user
did not name with a flag.

- A Hugging Face directory whose config.json has ``auto_map`` for a model type transformers has
  no class for: refused with a line naming --trust-code, never transformers' own interactive
  "run custom code? [y/N]" prompt (which pollutes stdout and runs the code when answered "y"),
  with stdin closed or on a terminal that answers "y". A known model type with a stray
  ``auto_map`` loads transformers' own class and runs nothing.
- A mistyped path or an unknown hub id: offline first (the local Hugging Face cache), one bounded
  request to the hub at most, one line naming both readings; a spec that can only be a path never
  touches the network.
- Fake ``.gguf`` files, device and pipe text files, oversized inputs: each says what is wrong.
"""
from __future__ import annotations

import json
import os
import pty  # noqa: F401 - documents that the terminal tests need a POSIX pty
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli_run import assert_one_line_error, cli_env, snapshot

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals, devices and pipes")

SENTINEL = "PWNED"
FAST_S = 5.0  # how long a spec that cannot load may take to say so (Python start-up included)


# --------------------------------------------------------------------------- fixtures
def tiny_llama_dir(d: Path, model_type: str | None = None, auto_map: bool = True) -> Path:
    """A tiny config-built Llama saved with save_pretrained (hidden 16, 1 layer, vocab 64), its
    config.json given ``model_type`` and an ``auto_map`` naming code that writes `SENTINEL` into
    the current directory when imported."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    if model_type is not None:
        config["model_type"] = model_type
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                              "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    payload = f"import pathlib\npathlib.Path({SENTINEL!r}).write_text('code from the model ran')\n"
    (d / "configuration_evil.py").write_text(payload + "from transformers import LlamaConfig\n\n\n"
                                             "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    (d / "modeling_evil.py").write_text(payload + "from transformers import LlamaForCausalLM\n\n"
                                        "from .configuration_evil import EvilConfig\n\n\n"
                                        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return d


@pytest.fixture
def work(tmp_path):
    """(work directory, environment): a fresh Hugging Face home outside the work directory, no
    hub token, no proxy exceptions, offline mode not set."""
    w = tmp_path / "work"
    w.mkdir()
    (w / "sentinel.txt").write_text("keep me\n")
    env = cli_env(HF_HOME=str(tmp_path / "hf-home"), DEPTHPRUNE_CACHE=str(tmp_path / "dp-cache"))
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "NO_PROXY", "no_proxy",
              "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_ENDPOINT"):
        env.pop(k, None)
    return w, env


def via(env: dict, port: int) -> dict:
    """``env`` with the hub (HF_ENDPOINT) and every proxy at 127.0.0.1:``port``."""
    url = f"http://127.0.0.1:{port}"
    return {**env, "HF_ENDPOINT": url, "HTTPS_PROXY": url, "HTTP_PROXY": url, "https_proxy": url, "http_proxy": url,
            "ALL_PROXY": url}


REFUSED = 9  # the discard port: nothing listens there, a connection is refused at once


def cli(argv: list[str], cwd: Path, env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI with stdin closed; the result and the seconds it took."""
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "depthprune.cli", *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t


def cli_on_terminal(argv: list[str], cwd: Path, env: dict, stdout_on_terminal: bool) -> tuple[int, str, str]:
    """The CLI with stdin (and, with ``stdout_on_terminal``, stdout) on a pseudo-terminal where
    "y" has been typed ahead: any prompt that reads it gets "yes". Returns the exit code, what
    went to stdout (the terminal's output when it is there) and stderr."""
    master, slave = os.openpty()
    os.write(master, b"y\n" * 8)
    out_chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal's other end closed it
                return
            if not chunk:
                return
            out_chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.Popen([sys.executable, "-m", "depthprune.cli", *argv], cwd=cwd, env=env, stdin=slave,
                             stdout=slave if stdout_on_terminal else subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(slave)
        out, err = p.communicate(timeout=300)
    finally:
        reader.join(10)
        os.close(master)
    text = b"".join(out_chunks).decode(errors="replace") if stdout_on_terminal else out.decode(errors="replace")
    if stdout_on_terminal:  # the terminal echoes what was typed ahead; that is not the command's output
        text = text.replace("y\r\n", "").replace("y\n", "")
    return p.returncode, text, err.decode(errors="replace")


class FakeHub:
    """A local TCP server standing in for the hub and any proxy: records the first line of every
    request. ``answer``: "close" (closes the connection at once), "hang" (never answers) or
    "404" (no such repository, as the hub says it)."""

    def __init__(self, answer: str = "close"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.answer, self._held = answer, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                head = conn.recv(65536)
            except OSError:
                head = b""
            self.requests.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            if self.answer == "hang":
                self._held.append(conn)
                continue
            if self.answer == "404":
                body = b'{"error": "Repository not found"}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-Error-Code: RepoNotFound\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            conn.close()

    def asked_for(self, name: str) -> list[str]:
        return [r for r in self.requests if name in r]

    def close(self) -> None:
        self.sock.close()
        for c in self._held:
            c.close()


# --------------------------------------------------------------------------- 7: auto_map
HOSTILE_ARGV = [["graph", "--model", "{d}"], ["candidates", "--model", "{d}", "--json"]]


def _argv(argv: list[str], d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in argv]


@pytest.mark.unit
@pytest.mark.parametrize("argv", HOSTILE_ARGV, ids=["graph", "candidates-json"])
def test_custom_code_refused_with_stdin_closed(argv, work):
    w, env = work
    d = tiny_llama_dir(w / "hostile", model_type="evil")
    before = snapshot(w)
    r, _ = cli(_argv(argv, d), w, via(env, REFUSED))
    assert_one_line_error(r, "--trust-code")
    assert "modeling_evil.py" in r.stderr
    assert r.stdout == "" and "[y/N]" not in r.stderr
    assert not (w / SENTINEL).exists() and not (d / SENTINEL).exists()
    assert snapshot(w) == before


@pytest.mark.unit
@pytest.mark.parametrize("stdout_on_terminal", [False, True], ids=["stdin-tty", "stdin-stdout-tty"])
@pytest.mark.parametrize("argv", HOSTILE_ARGV, ids=["graph", "candidates-json"])
def test_custom_code_refused_on_a_terminal_answering_yes(argv, stdout_on_terminal, work):
    w, env = work
    d = tiny_llama_dir(w / "hostile", model_type="evil")
    before = snapshot(w)
    code, out, err = cli_on_terminal(_argv(argv, d), w, via(env, REFUSED), stdout_on_terminal)
    assert_one_line_error(subprocess.CompletedProcess([], code, out, err), "--trust-code")
    assert "[y/N]" not in out and "custom code" not in out, out
    assert out.strip() == "", out
    assert not (w / SENTINEL).exists() and not (d / SENTINEL).exists()
    assert snapshot(w) == before


@pytest.mark.unit
def test_known_model_type_with_stray_auto_map_loads_the_builtin_class(work):
    w, env = work
    d = tiny_llama_dir(w / "stray", model_type=None)  # model_type stays "llama"
    r, _ = cli(["candidates", "--model", str(d), "--json"], w, via(env, REFUSED))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)["summary"]
    assert summary["units"] > 0 and summary["candidates"] > 0
    assert "[y/N]" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (w / SENTINEL).exists() and not (d / SENTINEL).exists()


@pytest.mark.unit
def test_custom_code_runs_only_when_the_caller_trusts_it(work):
    """The library's ``trust_code``: False refuses (naming --trust-code), True passes
    ``trust_remote_code=True`` to transformers and the model's own code runs."""
    w, env = work
    d = tiny_llama_dir(w / "hostile", model_type="evil")
    code = ("import sys\nfrom depthprune.adapters.load import load_model\nfrom depthprune.errors import UserError\n"
            "try:\n    load_model(sys.argv[1])\nexcept UserError as e:\n    print('refused:', e)\n"
            "import os\nprint('ran' if os.path.exists('PWNED') else 'clean')\n"
            "lm = load_model(sys.argv[1], trust_code=True)\nprint(type(lm.model).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code, str(d)], cwd=w, env=via(env, REFUSED),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and "--trust-code" in lines[0]
    assert lines[1] == "clean"
    assert lines[-1] == "EvilForCausalLM" and (w / SENTINEL).exists()


def hub_cache_entry(hf_home: Path, repo: str) -> Path:
    """An empty snapshot of hub model ``repo`` in a Hugging Face cache (what a download leaves)."""
    entry = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


@pytest.mark.unit
def test_cached_hub_id_loads_offline_first(work, tmp_path):
    """A hub id in the local cache loads from it with the hub unreachable: no request, no retries."""
    w, env = work
    tiny_llama_dir(hub_cache_entry(tmp_path / "hf-home", "someone/tiny"), auto_map=False)
    hub = FakeHub()
    try:
        r, took = cli(["candidates", "--model", "someone/tiny", "--json"], w, via(env, hub.port))
    finally:
        hub.close()
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["summary"]["units"] > 0
    assert "Retrying" not in r.stderr and "couldn't connect" not in r.stderr
    assert hub.requests == []


@pytest.mark.unit
def test_cached_hub_id_with_custom_code_is_refused(work, tmp_path):
    w, env = work
    snap = tiny_llama_dir(hub_cache_entry(tmp_path / "hf-home", "someone/evil"), model_type="evil")
    before = snapshot(w)
    r, _ = cli(["candidates", "--model", "someone/evil", "--json"], w, via(env, REFUSED))
    assert_one_line_error(r, "--trust-code")
    assert r.stdout == ""
    assert not (w / SENTINEL).exists() and not (snap / SENTINEL).exists()
    assert snapshot(w) == before


# --------------------------------------------------------------------------- 9: mistyped paths, hub ids
@pytest.fixture(scope="module")
def torch_import_s() -> float:
    """Seconds this machine takes to import torch (a command that imports it before looking at
    its spec pays that first)."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    return time.monotonic() - t


MISSING = [
    (["candidates", "--model", "out/nonexistent"], False),
    (["candidates", "--model", "nobody/no-such-model"], False),
    (["graph", "--model", "out/nonexistent"], False),
    (["eval", "out/nonexistent"], True),  # eval imports torch before it reads its spec
]


@pytest.mark.unit
@pytest.mark.parametrize("network", ["refused", "offline"])
@pytest.mark.parametrize("argv,late", MISSING, ids=[" ".join(a) for a, _ in MISSING])
def test_missing_path_or_hub_id_fails_fast(argv, late, network, work, torch_import_s):
    w, env = work
    env = via(env, REFUSED) if network == "refused" else {**env, "HF_HUB_OFFLINE": "1"}
    before = snapshot(w)
    r, took = cli(argv, w, env)
    assert_one_line_error(r, "no such file or directory, and")
    assert "hub" in r.stderr and "Retrying" not in r.stderr
    assert took < FAST_S + (torch_import_s if late else 0), took
    assert snapshot(w) == before


PATH_ONLY = ["./out/nonexistent", "../nonexistent", "out/deeper/nonexistent", "out/nonexistent/", "~/nonexistent",
             "my models/tiny", str(Path("/nonexistent") / "model")]


@pytest.mark.unit
@pytest.mark.parametrize("spec", PATH_ONLY)
def test_spec_that_can_only_be_a_path_never_touches_the_network(spec, work):
    w, env = work
    hub = FakeHub()
    try:
        r, took = cli(["candidates", "--model", spec], w, via(env, hub.port))
    finally:
        hub.close()
    assert_one_line_error(r, f"{spec}: no such file or directory")
    assert "hub" not in r.stderr
    assert hub.requests == []
    assert took < FAST_S, took


@pytest.mark.unit
@pytest.mark.parametrize("answer,contains", [("close", "no Hugging Face hub id of that name could be reached"),
                                             ("hang", "no Hugging Face hub id of that name could be reached in"),
                                             ("404", "no Hugging Face hub model of that name exists")])
def test_hub_id_lookup_is_one_bounded_request(answer, contains, work):
    """A hub id that is not in the cache: one request to the hub, no retries, a few seconds at
    most even when the hub accepts the connection and never answers."""
    from depthprune.adapters.spec import HUB_TIMEOUT
    w, env = work
    hub = FakeHub(answer)
    try:
        r, took = cli(["candidates", "--model", "nobody/no-such-model"], w, via(env, hub.port))
        time.sleep(0.2)
    finally:
        hub.close()
    assert_one_line_error(r, "nobody/no-such-model: no such file or directory, and " + contains)
    assert len(hub.asked_for("no-such-model")) <= 1, hub.requests
    assert took < HUB_TIMEOUT + FAST_S, took


# --------------------------------------------------------------------------- fake GGUF files
def gguf_bytes(meta: dict[str, str], tensors: list[tuple[str, int]], data: int) -> bytes:
    """A GGUF v3 file: string metadata, 1-D F32 tensors ``(name, length)``, ``data`` bytes of data."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        out += s(k) + struct.pack("<I", 8) + s(v)
    offset = 0
    for name, n in tensors:
        out += s(name) + struct.pack("<IQIQ", 1, n, 0, offset)
        offset += 4 * n
    out += bytes(-len(out) % 32)
    return out + bytes(data)


GGUF_CASES = [
    ("random-bytes", lambda p: p.write_bytes(bytes(range(256)) * 8), "not a GGUF file"),
    ("directory", lambda p: p.mkdir(), "is a directory, not a GGUF file"),
    ("device", lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    ("garbage-metadata", lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 7) + bytes(range(7, 250)) * 4),
     "not a valid GGUF file"),
    ("no-architecture", lambda p: p.write_bytes(gguf_bytes({"general.name": "x"}, [("w", 16)], 64)),
     "names no general.architecture"),
    ("truncated-data", lambda p: p.write_bytes(gguf_bytes({"general.architecture": "llama"}, [("w", 1024)], 100)),
     "truncated"),
    ("metadata-past-end", lambda p: p.write_bytes(gguf_bytes({"general.architecture": "llama"}, [("w", 4)], 16)[:40]),
     "runs past the end of the file"),
]


@pytest.mark.unit
@pytest.mark.parametrize("make,contains", [c[1:] for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_fake_gguf_says_what_is_wrong(make, contains, work):
    w, env = work
    make(w / "model.gguf")
    before = snapshot(w)
    r, _ = cli(["candidates", "--model", str(w / "model.gguf")], w, via(env, REFUSED))
    assert_one_line_error(r, contains)
    assert "JSON" not in r.stderr
    assert snapshot(w) == before


# --------------------------------------------------------------------------- text and configs read whole
def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _huge(p: Path, mib: int = 300) -> None:
    with open(p, "wb") as f:  # sparse: takes no disk space
        f.truncate(mib * 2**20)


TEXT_CASES = [
    ("dev-zero", lambda w: "/dev/zero", "not a regular file (a character device)"),
    ("link-to-dev-zero", lambda w: (w / "z.txt").symlink_to("/dev/zero") or str(w / "z.txt"),
     "not a regular file (a character device)"),
    ("fifo", lambda w: _fifo(w / "pipe.txt") or str(w / "pipe.txt"), "not a regular file (a named pipe)"),
    ("huge", lambda w: _huge(w / "huge.txt") or str(w / "huge.txt"), "a text is read whole, at most"),
]


@pytest.mark.unit
@pytest.mark.parametrize("make,contains", [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_calib_text_that_is_no_regular_file(make, contains, work):
    w, env = work
    path = make(w)
    before = snapshot(w) if not path.endswith("huge.txt") else None  # (snapshot would read 300 MiB)
    r, took = cli(["prune", "--model", "random-llama:2", "--target", "0.2", "--calib", path, "--out", str(w / "out")],
                  w, env, timeout=120)
    assert_one_line_error(r, contains)
    assert "--calib" in r.stderr and "does not exist" not in r.stderr
    assert not (w / "out").exists()
    if before is not None:
        assert snapshot(w) == before


@pytest.mark.unit
def test_eval_text_dev_zero(work):
    w, env = work
    r, _ = cli(["eval", "random-llama:2", "--text", "/dev/zero"], w, env, timeout=300)
    assert_one_line_error(r, "is not a regular file (a character device)")
    assert "does not exist" not in r.stderr


CONFIG_CASES = [
    ("dev-zero", lambda c: c.symlink_to("/dev/zero"), "is not a regular file"),
    ("huge", lambda c: _huge(c, 32), "more than a model configuration has"),
    ("directory", lambda c: c.mkdir(), "is not a regular file"),
]


@pytest.mark.unit
@pytest.mark.parametrize("make,contains", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_json_that_is_no_regular_file(make, contains, work):
    w, env = work
    (w / "hf").mkdir()
    make(w / "hf" / "config.json")
    before = snapshot(w)
    r, took = cli(["candidates", "--model", str(w / "hf")], w, env)
    assert_one_line_error(r, contains)
    assert took < FAST_S, took
    assert snapshot(w) == before
