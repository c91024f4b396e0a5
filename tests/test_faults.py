"""Faults and accidents: killed runs, concurrent runs, damaged caches, hostile plans, --force
in the wrong place. Nothing a user had is lost, nothing half-written is left."""
from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from cli_run import assert_one_line_error, cli_env, held, run_cli, snapshot

UNITS = ["--units", "model.layers.1.self_attn"]


def prune_args(out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", "random-llama:2", *UNITS, "--out", str(out), *extra]


def target_args(out: Path) -> list[str]:
    return ["prune", "--model", "random-llama:2", "--target", "0.3", "--score", "random", "--schedule", "iterative",
            "--calib-samples", "2", "--seq-len", "16", "--out", str(out)]




def leftovers(parent: Path) -> list[str]:
    """Hidden depthprune siblings (temporary, moved-aside, lock) in ``parent``."""
    return sorted(n.name for n in parent.iterdir() if n.name.startswith(".") and "depthprune" in n.name)


# --------------------------------------------------------------------------- killed runs
@pytest.mark.integration
@pytest.mark.parametrize("point,sig,code", [("start", signal.SIGTERM, 143), ("step", signal.SIGTERM, 143),
                                            ("write", signal.SIGTERM, 143), ("commit", signal.SIGTERM, 143),
                                            ("write", signal.SIGINT, 130)])
def test_killed_prune_leaves_nothing_and_the_next_run_succeeds(tmp_path, point, sig, code):
    out = tmp_path / "out"
    args = target_args(out) if point == "step" else prune_args(out)
    p = held(args, point, tmp_path / "flag")
    if point in ("write", "commit"):  # the temporary sibling holds the weights by now
        (tmp,) = [n for n in tmp_path.iterdir() if ".depthprune-tmp-" in n.name]
        assert (tmp / "model.safetensors").stat().st_size > 0
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "Traceback" not in err and "no partial output left" in err
    assert sorted(n.name for n in tmp_path.iterdir()) == ["flag"]  # no output, no temporary, no lock
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / ".depthprune").is_file() and not leftovers(tmp_path)


@pytest.mark.integration
def test_kill_9_leftovers_are_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    p = held(prune_args(out), "write", tmp_path / "flag")
    p.kill()
    p.communicate(timeout=60)
    left = leftovers(tmp_path)
    assert any(".depthprune-tmp-" in n for n in left) and not out.exists()  # what SIGKILL leaves
    r = run_cli(prune_args(out))
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path) == [] and (out / "plan.json").is_file()


@pytest.mark.integration
def test_interrupted_force_keeps_the_previous_output(tmp_path, pruned_dir):
    out = copy_of(pruned_dir, tmp_path / "out")  # a previous output of the same command
    before = snapshot(tmp_path)
    p = held(prune_args(out, "--force"), "commit", tmp_path / "flag")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    (tmp_path / "flag").unlink()
    assert p.returncode == 143 and snapshot(tmp_path) == before


@pytest.mark.unit
def test_a_run_killed_while_replacing_gets_its_previous_output_back(tmp_path):
    """Between moving the old output aside and moving the new one in (a few renames with
    signals blocked, so only kill -9 or power loss gets there), the next run restores it."""
    from depthprune.io.outdir import OutputDir, write_output_dir
    out = tmp_path / "out"
    write_output_dir(out, {"plan.json": {"v": 1}})
    os.rename(out, tmp_path / ".out.depthprune-old-999999")
    from depthprune.errors import UserError
    with pytest.raises(UserError, match="pass --force"):
        with OutputDir(out):
            pass
    assert json.loads((out / "plan.json").read_text()) == {"v": 1} and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- concurrent runs
@pytest.mark.integration
def test_two_runs_on_one_out_give_one_result_and_one_clear_error(tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "flag"
    first = held(prune_args(out), "start", flag)
    t0 = time.monotonic()
    second = run_cli(prune_args(out, "--force"))
    waited = time.monotonic() - t0
    assert_one_line_error(second, f"is being written by another depthprune run (process {first.pid})")
    flag.unlink()  # let the first run go on
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert [s["unit"] for s in plan["steps"]] == ["model.layers.1.self_attn"] and leftovers(tmp_path) == []
    print(f"second run refused after {waited:.2f} s")


# --------------------------------------------------------------------------- --force
@pytest.mark.integration
def test_force_refuses_everything_but_a_previous_output(tmp_path, pruned_dir):
    w = tmp_path / "w"
    (w / "mine").mkdir(parents=True)
    (w / "mine" / "thesis.tex").write_text("years of work\n")
    model = w / "model"  # a Hugging Face-looking directory, the model being read
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    for out, cwd, msg in ((".", w, "not a depthprune output"), ("..", w / "mine", "not a depthprune output"),
                          (str(w / "mine"), w, "not a depthprune output"), (str(model), w, "not a depthprune output")):
        r = run_cli(["prune", "--model", str(model), *UNITS, "--out", out, "--force"], cwd=cwd)
        assert_one_line_error(r, msg)
    assert snapshot(tmp_path) == before
    # a depthprune output that is the model being read, or the current directory, is refused too
    copy_of(pruned_dir, w / "prev")  # what `prune_args(w / "prev")` writes
    before = snapshot(tmp_path)
    r = run_cli(["sparsify", "--model", str(w / "prev"), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(w / "prev"), "--force"], cwd=w)
    assert_one_line_error(r, "it is the model being read")
    r = run_cli(prune_args(Path("."), "--force"), cwd=w / "prev")
    assert_one_line_error(r, "it is the current directory")
    assert snapshot(tmp_path) == before
    # a previous output elsewhere: replaced, with nothing left beside it
    r = run_cli(["prune", "--model", "random-llama:2", "--units", "model.layers.0.mlp.up_proj", "--out",
                 str(w / "prev"), "--force"], cwd=w)
    assert r.returncode == 0, r.stderr
    plan = json.loads((w / "prev" / "plan.json").read_text())
    assert [s["unit"] for s in plan["steps"]] == ["model.layers.0.mlp.up_proj"] and leftovers(w) == []


# --------------------------------------------------------------------------- hostile plan
HOSTILE = """
import pathlib, torch
pathlib.Path({flag!r}).write_text("code ran")
def make():
    return torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.zeros(1, 4),)
"""


@pytest.mark.integration
def test_hostile_plan_is_refused_and_runs_nothing(tmp_path):
    flag = tmp_path / "PWNED"
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "hostile.py").write_text(HOSTILE.format(flag=str(flag)))
    d = tmp_path / "shared_dir"
    d.mkdir()
    header = json.dumps({"0.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    (d / "plan.json").write_text(json.dumps({"format": 1, "base": "python:hostile:make", "fingerprint": "x",
                                             "recipe": {}, "folds": [], "steps": []}))
    before = snapshot(tmp_path)
    env = cli_env([mods])
    for cmd in (["sparsify", "--model", str(d), "--method", "magnitude", "--sparsity", "0.5", "--out",
                 str(tmp_path / "o")],
                ["sparsify", "--model", str(d), "--explain"],
                ["sparsify", "--model", str(d), "--explain", "--trust-checkpoint"]):
        r = run_cli(cmd, env=env)
        assert_one_line_error(r, "--trust-code")
        assert "python:hostile:make" in r.stderr
    assert not flag.exists() and snapshot(tmp_path) == before
    # the library refuses too, without importing the module
    sys.path.insert(0, str(mods))
    try:
        from depthprune.errors import UserError
        from depthprune.io.model_dir import load_pruned
        with pytest.raises(UserError, match="--trust-code"):
            load_pruned(d)
        assert "hostile" not in sys.modules and not flag.exists()
    finally:
        sys.path.remove(str(mods))
    # control: with --trust-code the module is imported (so the checks above can fail)
    r = run_cli(["sparsify", "--model", str(d), "--explain", "--trust-code"], env=env)
    assert flag.read_text() == "code ran", r.stderr


# --------------------------------------------------------------------------- cache entries
def _build_entry(calls: list):
    def build(staging: Path) -> None:
        calls.append(staging.name)
        header = json.dumps({"w": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]}}).encode()
        (staging / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(1024))
        (staging / "config.json").write_text('{"n": 256}')
    return build


@pytest.mark.unit
def test_truncated_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys):
    from depthprune.adapters.packaged import cache_dir
    from depthprune.integrity import MANIFEST, cached_dir, verify
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    target = cache_dir() / "models" / "tiny"
    calls: list = []
    assert cached_dir(target, _build_entry(calls), "tiny") == target and len(calls) == 1
    good = (target / "model.safetensors").read_bytes()
    assert cached_dir(target, _build_entry(calls), "tiny") == target and len(calls) == 1  # verified, reused
    with open(target / "model.safetensors", "r+b") as f:  # truncated (a full disk, a killed copy)
        f.truncate(500)
    assert verify(target) is not None
    cached_dir(target, _build_entry(calls), "tiny")
    assert len(calls) == 2 and (target / "model.safetensors").read_bytes() == good and verify(target) is None
    assert "damaged" in capsys.readouterr().err
    # same size, different bytes, new mtime: the checksum catches it
    data = bytearray(good)
    data[-1] = 7
    (target / "model.safetensors").write_bytes(bytes(data))
    cached_dir(target, _build_entry(calls), "tiny")
    assert len(calls) == 3 and (target / "model.safetensors").read_bytes() == good
    # touched but unchanged: re-hashed once, not rebuilt
    os.utime(target / "model.safetensors", ns=(1, 1))
    cached_dir(target, _build_entry(calls), "tiny")
    assert len(calls) == 3
    # a damaged manifest: rebuilt
    (target / MANIFEST).write_text("{")
    cached_dir(target, _build_entry(calls), "tiny")
    assert len(calls) == 4 and verify(target) is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no staging left


@pytest.mark.unit
def test_cache_entry_without_manifest_is_adopted_when_intact(tmp_path):
    from depthprune.errors import UserError
    from depthprune.integrity import cached_dir, check_safetensors, verify
    target = tmp_path / "old"
    target.mkdir()
    calls: list = []
    _build_entry([])(target)  # an entry written before manifests existed

    def adopt(entry: Path) -> None:
        check_safetensors(entry / "model.safetensors")

    cached_dir(target, _build_entry(calls), "old", adopt, log=lambda line: None)
    assert calls == [] and verify(target) is None
    (target / ".depthprune-cache.json").unlink()
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(100)
    cached_dir(target, _build_entry(calls), "old", adopt, log=lambda line: None)
    assert len(calls) == 1 and verify(target) is None
    with pytest.raises(UserError):
        check_safetensors(tmp_path / "none.safetensors")


@pytest.mark.slow
def test_truncated_smollm2_cache_is_rebuilt(tmp_path):
    """The real cache entry (the packaged GGUF converted to safetensors), truncated in a cache
    of its own: the next load rebuilds it instead of failing for ever. The entry is copied from
    the cache every test shares when it is there (`make test` converts it first), else built."""
    import shutil
    from depthprune.adapters.packaged import cache_dir
    env = cli_env(DEPTHPRUNE_CACHE=str(tmp_path / "cache"))
    shared = cache_dir() / "models"
    if (shared / "smollm2-135m" / "model.safetensors").is_file():
        shutil.copytree(shared, tmp_path / "cache" / "models")
    r = run_cli(["graph", "--model", "smollm2-135m", "--json", "-q"], env=env)
    assert r.returncode == 0, r.stderr
    weights = tmp_path / "cache" / "models" / "smollm2-135m" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    r2 = run_cli(["graph", "--model", "smollm2-135m", "--json", "-q"], env=env)
    assert r2.returncode == 0, r2.stderr
    assert "damaged" in r2.stderr and json.loads(r2.stdout) == json.loads(r.stdout)


# --------------------------------------------------------------------------- modes, reports, progress
@pytest.mark.integration
def test_outputs_follow_the_umask_and_reports_keep_every_section(tmp_path):
    import subprocess
    out, sparse = tmp_path / "pruned", tmp_path / "sparse"

    def run(args, mask):
        return subprocess.run([sys.executable, "-m", "depthprune.cli", *args], env=cli_env(), capture_output=True,
                              text=True, preexec_fn=lambda: os.umask(mask))

    r = run(prune_args(out), 0o027)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert {"model.safetensors", "plan.json", "report.json", "report.html", ".depthprune"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes
    r = run(["sparsify", "--model", str(out), "--method", "magnitude", "--sparsity", "0.5", "--out", str(sparse),
             "--json"], 0o022)
    assert r.returncode == 0, r.stderr
    assert sparse.stat().st_mode & 0o777 == 0o755 and all(p.stat().st_mode & 0o777 == 0o644 for p in sparse.iterdir())
    pruned, report = json.loads((out / "report.json").read_text()), json.loads((sparse / "report.json").read_text())
    # top level: the writing command's keys, as before sections existed
    assert pruned["command"] == "prune" and pruned["params_before"] > pruned["params_after"]
    assert report["command"] == "sparsify" and report["method"] == "magnitude" and report["nonzero_after"] > 0
    # sections: prune's record travels with the sparsified model
    assert report["prune"] == pruned["prune"] == {k: v for k, v in pruned.items() if k not in ("command", "prune")}
    assert report["sparsify"]["nonzero_after"] == report["nonzero_after"]
    assert json.loads(r.stdout)["nonzero_after"] == report["nonzero_after"]  # --json: stdout is only the report
    # exports too (safetensors writes 0600 by itself)
    exp = tmp_path / "exp"
    r = run(["export", str(out), "--format", "depthprune", "--out", str(exp)], 0o022)
    assert r.returncode == 0, r.stderr
    assert exp.stat().st_mode & 0o777 == 0o755 and all(p.stat().st_mode & 0o777 == 0o644 for p in exp.iterdir())
    assert not (exp / ".depthprune").exists()  # an export is not a depthprune output directory


@pytest.mark.integration
def test_progress_goes_to_stderr_and_quiet_silences_it(tmp_path):
    args = ["prune", "--model", "random-llama:2", "--target", "0.3", "--score", "angular", "--calib-samples", "4",
            "--seq-len", "16", "--json"]
    r = run_cli(args + ["--out", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr
    assert "reduction %" in r.stderr and "angular" in r.stderr  # the schedule's and the scorer's bars
    assert json.loads(r.stdout)["reached"] is True  # stdout is one JSON object
    q = run_cli(args + ["--out", str(tmp_path / "b"), "--quiet"])
    assert q.returncode == 0 and q.stderr == "", q.stderr


@pytest.mark.unit
def test_report_sections_are_kept_across_commands(tmp_path):
    from depthprune.errors import UserError
    from depthprune.io.outdir import write_output_dir
    from depthprune.io.report import command_report, read_report, update_report
    legacy = {"model": "m", "params_before": 10, "params_after": 8, "reduction": 0.2, "units": [], "seconds": 1.0}
    rep = command_report("sparsify", {"method": "stade", "nonzero_after": 5, "seconds": 2.0}, legacy)
    assert rep["command"] == "sparsify" and rep["method"] == "stade" and rep["prune"] == legacy
    assert rep["sparsify"] == {"method": "stade", "nonzero_after": 5, "seconds": 2.0}
    # sparsify again: its own section is the latest, prune's stays
    again = command_report("sparsify", {"method": "wanda", "seconds": 3.0}, rep)
    assert again["prune"] == legacy and again["sparsify"]["method"] == "wanda" and "nonzero_after" not in again
    # a command that adds in place (eval) keeps the top level and every section
    d = write_output_dir(tmp_path / "d", {"report.json": rep})
    update_report(d, "eval", {"perplexity": 42.0})
    after = read_report(d)
    assert after["eval"] == {"perplexity": 42.0}
    assert {k: v for k, v in after.items() if k != "eval"} == rep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary file, no lock left
    with pytest.raises(UserError, match="not a depthprune output"):
        update_report(tmp_path, "eval", {})
    (d / "report.json").write_text("[1]")
    with pytest.raises(UserError, match="not an object"):
        read_report(d)


@pytest.mark.unit
def test_what_counts_as_a_depthprune_output(tmp_path):
    from depthprune.io.outdir import is_depthprune_output, write_output_dir
    plan = json.dumps({"format": 1, "base": "random-llama:2", "fingerprint": "f", "steps": []})
    assert is_depthprune_output(write_output_dir(tmp_path / "new", {"plan.json": plan}))
    legacy = tmp_path / "legacy"  # written before markers: only depthprune's own files
    legacy.mkdir()
    (legacy / "plan.json").write_text(plan)
    (legacy / "model.safetensors").write_bytes(b"x")
    (legacy / "report.json").write_text("{}")
    assert is_depthprune_output(legacy)
    (legacy / "notes.md").write_text("mine")
    assert not is_depthprune_output(legacy)  # anything else of the user's: not ours
    mine = tmp_path / "mine"  # a user's own plan.json and report.json
    mine.mkdir()
    (mine / "plan.json").write_text('{"tasks": []}')
    (mine / "model.safetensors").write_bytes(b"x")
    assert not is_depthprune_output(mine) and not is_depthprune_output(tmp_path / "none")
    (mine / ".depthprune").write_text('{"tool": "other"}')
    assert not is_depthprune_output(mine)


@pytest.mark.unit
def test_signal_inside_an_output_dir_removes_it_and_restores_the_handlers(tmp_path, request):
    from depthprune.io.outdir import OutputDir, Terminated
    # Python's own SIGINT handler, also when this run was started with SIGINT ignored (as a
    # background job); an ignored SIGINT stays ignored inside an OutputDir
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Terminated):
        with OutputDir(tmp_path / "a" / "b" / "out") as od:
            (od.tmp / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(tmp_path / "out"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert list(tmp_path.iterdir()) == []  # no output, no temporary, no lock, no parents it made


# --------------------------------------------------------------------------- hostile input: writes
# Every fixed name depthprune writes beside or inside an output, a planted link on it, a file of the
# model being read, a user's file inside an output, a full disk, a read-only file system: one line,
# exit 2, and every byte that was there (the links' targets included) is still there.

@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    """One small self-contained prune output (random-llama:2, attention of block 1 removed)."""
    d = tmp_path_factory.mktemp("pruned") / "p"
    r = run_cli(prune_args(d, "-q"))
    assert r.returncode == 0, r.stderr
    return d


def copy_of(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


def sentinel(w: Path) -> Path:
    s = w / "precious.txt"
    s.write_text("the user's own file\n")
    return s


@pytest.mark.integration
def test_planted_links_on_every_fixed_name_are_never_followed(tmp_path, pruned_dir):
    w = tmp_path / "w"
    w.mkdir()
    target = sentinel(tmp_path)
    d = copy_of(pruned_dir, w / "d")
    # the lock beside --out
    (w / ".new.depthprune-lock").symlink_to(target)
    before = snapshot(tmp_path)
    r = run_cli(prune_args(w / "new"))
    assert_one_line_error(r, "is a symbolic link, not depthprune's lock file")
    assert snapshot(tmp_path) == before
    (w / ".new.depthprune-lock").unlink()
    # report.html rewritten in place (viz --report, eval): a link there is refused, never followed,
    # before any evaluation; the old fixed temporary names are not used at all
    for name in (".report.html.tmp", ".map.png.tmp.png", ".curves.png.tmp.png"):
        (d / name).symlink_to(target)
    (w / ".map.png.tmp.png").symlink_to(target)
    r = run_cli(["viz", str(d), "--report", "--map", str(w / "map.png")])
    assert r.returncode == 0, r.stderr
    assert target.read_text() == "the user's own file\n" and (d / "report.html").is_file()
    assert not (d / "report.html").is_symlink() and (w / "map.png").stat().st_size > 0
    (d / "report.html").unlink()
    (d / "report.html").symlink_to(target)
    before = snapshot(tmp_path)
    for args in (["viz", str(d), "--report"], ["eval", str(d), "--text", "shakespeare:eval"]):
        r = run_cli(args)
        assert_one_line_error(r, "report.html")
        assert snapshot(tmp_path) == before, args


@pytest.mark.integration
def test_force_never_overwrites_the_model_being_read_or_a_users_files(tmp_path, pruned_dir):
    w = tmp_path / "w"
    w.mkdir()
    hf = w / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    d = copy_of(pruned_dir, w / "d")
    before = snapshot(tmp_path)
    r = run_cli(["graph", "--model", str(hf), "--out", str(hf / "config.json"), "--force"])
    assert_one_line_error(r, "it is inside the model being read")
    r = run_cli(["viz", str(d), "--out", str(d / "plan.json"), "--force"])
    assert_one_line_error(r, "it is inside the model being read")
    assert snapshot(tmp_path) == before
    # a file a user added inside a depthprune output, and a nested output: named, refused
    (d / "notes.md").write_text("mine\n")
    r = run_cli(["sparsify", "--model", str(pruned_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(d / "sub")])
    assert r.returncode == 0, r.stderr
    before = snapshot(tmp_path)
    r = run_cli(prune_args(d, "--force"))
    assert_one_line_error(r, "--force would remove what depthprune did not write")
    assert "notes.md" in r.stderr and "sub/" in r.stderr
    assert snapshot(tmp_path) == before
    # what depthprune wrote there itself (report.html rewritten by viz, the eval section) is its own
    (d / "notes.md").unlink()
    import shutil
    shutil.rmtree(d / "sub")
    assert run_cli(["viz", str(d), "--report"]).returncode == 0
    r = run_cli(prune_args(d, "--force"))
    assert r.returncode == 0, r.stderr


def _limited(limit: int):
    """In the child: files larger than ``limit`` bytes cannot be written (EFBIG, as a full disk)."""
    def pre() -> None:
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.integration
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, pruned_dir):
    import subprocess
    w = tmp_path / "w"
    w.mkdir()
    for args in (prune_args(w / "out"), ["export", str(pruned_dir), "--format", "depthprune", "--out", str(w / "exp")]):
        r = subprocess.run([sys.executable, "-m", "depthprune.cli", *args], env=cli_env(), capture_output=True,
                           text=True, preexec_fn=_limited(64 * 1024), timeout=600)
        assert_one_line_error(r, "larger than the file system")
        assert list(w.iterdir()) == [], args
    # the report is part of the output: a failure writing it leaves no output at all
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import errno\nimport depthprune.viz.report_html as r\n"
        "def boom(*a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "r.write_report = boom\n")
    r = run_cli(prune_args(w / "out"), env=cli_env([site]))
    assert_one_line_error(r, "the disk is full")
    assert list(w.iterdir()) == []


@pytest.mark.integration
def test_an_undecodable_out_name_gives_a_complete_output(tmp_path):
    import subprocess
    name = os.fsdecode(b"out-\xff")
    r = subprocess.run([sys.executable, "-m", "depthprune.cli", *prune_args(tmp_path / name, "-q")], env=cli_env(),
                       capture_output=True, timeout=600)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert r.stdout.endswith(os.fsencode(tmp_path / name) + b"\n")  # the name as given
    out = tmp_path / name
    assert (out / "report.html").is_file() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.integration
def test_outputs_that_cannot_be_made_are_refused_before_loading(tmp_path, pruned_dir):
    w = tmp_path / "w"
    w.mkdir()
    (w / "file").write_text("x")
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    r = run_cli(["export", str(pruned_dir), "--format", "hf", "--out", str(w / "file" / "exp")])
    assert_one_line_error(r, "is a file, not a directory")
    env = cli_env(DEPTHPRUNE_CACHE=str(w / "file"))
    r = run_cli(["graph", "--model", "smollm2-135m"], env=env)
    assert_one_line_error(r, "DEPTHPRUNE_CACHE")
    assert time.monotonic() - t0 < 120 and snapshot(tmp_path) == before


def _read_only_mount(path: Path) -> bool:
    import subprocess
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.integration
def test_a_read_only_file_system_is_one_line(tmp_path, pruned_dir):
    import subprocess
    ro = tmp_path / "ro"
    if not _read_only_mount(ro):
        pytest.skip("cannot mount a file system here (not root, or no mount permission)")
    try:
        entry = ro / "models" / "smollm2-135m"
        entry.mkdir(parents=True)
        (entry / "model.safetensors").write_bytes(b"damaged")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = snapshot(tmp_path)
        r = run_cli(["export", str(pruned_dir), "--format", "hf", "--out", str(ro / "exp")])
        assert_one_line_error(r, "read-only file system")
        r = run_cli(prune_args(ro / "out"))
        assert_one_line_error(r, "read-only file system")
        r = run_cli(["graph", "--model", "smollm2-135m"], env=cli_env(DEPTHPRUNE_CACHE=str(ro)))
        assert_one_line_error(r, "the cache is not writable")
        assert snapshot(tmp_path) == before
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.integration
def test_damaged_reports_and_endless_inputs_are_one_line(tmp_path, pruned_dir):
    d = copy_of(pruned_dir, tmp_path / "d")
    (d / "report.json").write_bytes(os.urandom(256))
    before = snapshot(tmp_path)
    r = run_cli(["eval", str(d), "--text", "shakespeare:eval"])
    assert_one_line_error(r, "report.json is not")
    (d / "report.json").write_text("[1, 2, 3]")
    before = snapshot(tmp_path)
    r = run_cli(["viz", str(d), "--report"])
    assert_one_line_error(r, "holds a JSON list, not a report object")
    r = run_cli(["viz", "--curves", "/dev/zero", "--curves-out", str(tmp_path / "c.png")])
    assert_one_line_error(r, "/dev/zero is not a regular file")
    assert snapshot(tmp_path) == before


@pytest.mark.integration
def test_shapes_from_json_are_checked_before_anything_is_allocated(tmp_path, pruned_dir):
    t0 = time.monotonic()
    d = copy_of(pruned_dir, tmp_path / "layers")
    s = json.loads((d / "structure.json").read_text())
    s["base"]["config"]["num_hidden_layers"] = 200000
    (d / "structure.json").write_text(json.dumps(s))
    r = run_cli(["eval", str(d), "--text", "shakespeare:eval"])
    assert_one_line_error(r, "far larger than its weights file")
    d = copy_of(pruned_dir, tmp_path / "buffer")
    s = json.loads((d / "structure.json").read_text())
    rec = next(m for m in s["modules"].values() if m.get("parameters"))
    rec["buffers"]["huge"] = [10**6, 10**6, 10**3]
    (d / "structure.json").write_text(json.dumps(s))
    r = run_cli(["export", str(d), "--format", "hf", "--out", str(tmp_path / "exp")])
    assert_one_line_error(r, "which the weights file does not hold")
    assert time.monotonic() - t0 < 120 and not (tmp_path / "exp").exists()
