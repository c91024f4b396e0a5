"""Every bad input a user can give, through the real CLI: exit code 2, exactly one line on
stderr, no traceback, nothing created, changed or removed in and around ``--out``."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import assert_one_line_error, cli_env, run_cli, snapshot, start_cli

PLAN = {"format": 1, "base": "random-llama:2", "fingerprint": "0" * 16, "recipe": {}, "folds": [], "steps": []}


def safetensors_bytes(n: int = 2) -> bytes:
    """A valid safetensors file holding one float32 tensor of ``n`` zeros."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * n)


def hf_dir(w: Path, config="{}", weights: bytes | None = None, name: str = "hf") -> None:
    d = w / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)


def out_dir(w: Path, plan=PLAN, weights: bytes | None = None, name: str = "o1", marker: bool = True,
            extra: dict | None = None) -> None:
    """A depthprune output directory, hand-made (valid or damaged)."""
    d = w / name
    d.mkdir()
    (d / "plan.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    if marker:
        (d / ".depthprune").write_text(json.dumps({"tool": "depthprune", "format": 1, "command": "prune"}))
    for k, v in (extra or {}).items():
        (d / k).write_text(v)


def module(w: Path, name: str, source: str) -> None:
    (w / "mods").mkdir(exist_ok=True)
    (w / "mods" / f"{name}.py").write_text(source)


TINY = ("import torch\nfrom torch import nn\n"
        "def make():\n    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))\n"
        "    return m, (torch.zeros(1, 4),)\n")

PRUNE = ["prune", "--model", "random-llama:2", "--out", "{w}/out"]
TARGET = PRUNE + ["--target", "0.2"]
SPARSIFY = ["sparsify", "--model", "random-llama:2", "--method", "magnitude", "--out", "{w}/out"]
UNIT = ["--units", "model.layers.1.self_attn"]

# (id, argv with {w} for the work directory, text the error must contain, setup(w) or None)
CASES = [
    # numeric flags and their ranges
    ("batch-size-0", TARGET + ["--batch-size", "0"], "--batch-size: must be at least 1", None),
    ("calib-samples-0", TARGET + ["--calib-samples", "0"], "--calib-samples: must be at least 1", None),
    ("seq-len-1", TARGET + ["--seq-len", "1"], "--seq-len: must be at least 2", None),
    ("seq-len-text", TARGET + ["--seq-len", "many"], "expected an integer", None),
    ("target-1.5", PRUNE + ["--target", "1.5"], "fraction in [0, 1)", None),
    ("target-negative", PRUNE + ["--target", "-0.1"], "fraction in [0, 1)", None),
    ("target-nan", PRUNE + ["--target", "nan"], "fraction in [0, 1)", None),
    ("target-text", PRUNE + ["--target", "half"], "expected a fraction", None),
    ("rescore-top-negative", TARGET + ["--rescore-top", "-1"], "--rescore-top: must be at least 0", None),
    ("rescore-compensated-negative", TARGET + ["--rescore-compensated", "-1"],
     "--rescore-compensated: must be at least 0", None),
    ("rescore-compensated-word", TARGET + ["--rescore-compensated", "most"],
     "--rescore-compensated: expected a count or 'all', got 'most'", None),
    ("rescore-compensated-no-compensate", TARGET + ["--rescore-compensated", "4", "--no-compensate"],
     "it needs --compensate", None),
    ("rescore-compensated-angular", TARGET + ["--rescore-compensated", "4", "--score", "angular"],
     "needs --score ce or ppl", None),
    ("rescore-compensated-one-shot", TARGET + ["--rescore-compensated", "4", "--score", "ce", "--schedule", "shared"],
     "needs a re-scoring schedule", None),
    ("rescore-compensated-units", PRUNE + UNIT + ["--rescore-compensated", "4"], "--units are applied as given", None),
    ("rescore-windows-1", TARGET + ["--rescore-windows", "1"], "give 0 (off) or at least 2", None),
    ("rescore-windows-no-rerank", TARGET + ["--rescore-windows", "3", "--rescore-compensated", "0"],
     "it needs --rescore-compensated M", None),
    ("rescore-windows-units", PRUNE + UNIT + ["--rescore-windows", "3"], "--units are applied as given", None),
    ("cross-fit-no-rerank", TARGET + ["--cross-fit", "--rescore-compensated", "0"],
     "--cross-fit scores the trials of the compensated re-ranking", None),
    ("cross-fit-units", PRUNE + UNIT + ["--cross-fit"], "--units are applied as given", None),
    ("rescore-outsiders-all", TARGET + ["--rescore-outsiders", "--rescore-compensated", "all"],
     "--rescore-outsiders lets the groups outside the compensated re-ranking compete", None),
    ("rescore-outsiders-units", PRUNE + UNIT + ["--rescore-outsiders"], "--units are applied as given", None),
    ("effort-and-score", TARGET + ["--effort", "fast", "--score", "ce"], "give either --effort or those flags", None),
    ("effort-units", PRUNE + UNIT + ["--effort", "fast"], "--effort chooses how --target selects", None),
    ("effort-unknown", TARGET + ["--effort", "fastest"], "invalid choice: 'fastest'", None),
    ("device-unknown", TARGET + ["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto", None),
    ("sparsity-1", SPARSIFY + ["--sparsity", "1.0"], "fraction in [0, 1)", None),
    ("pattern-4:2", SPARSIFY + ["--pattern", "4:2"], "0 < N < M", None),
    ("pattern-0:4", SPARSIFY + ["--pattern", "0:4"], "0 < N < M", None),
    ("pattern-text", SPARSIFY + ["--pattern", "2:x"], "N:M with integers", None),
    ("pattern-three-parts", SPARSIFY + ["--pattern", "1:2:4"], "N:M with integers", None),
    # flag combinations
    ("sparsity-and-pattern", SPARSIFY + ["--sparsity", "0.5", "--pattern", "2:4"], "not allowed with", None),
    ("sparsity-nor-pattern", SPARSIFY, "exactly one of --sparsity or --pattern", None),
    ("sparsify-without-out", ["sparsify", "--model", "random-llama:2", "--sparsity", "0.5"], "--out is required",
     None),
    ("units-and-target", PRUNE + UNIT + ["--target", "0.2"], "either --units", None),
    ("units-nor-target", PRUNE, "either --units", None),
    ("units-empty", PRUNE + ["--units", " , "], "at least one unit name", None),
    ("units-twice", PRUNE + ["--units", "a,a"], "names a unit twice", None),
    ("unit-unknown", PRUNE + ["--units", "model.layers.0.nope"], "", None),
    ("window-needs-block", TARGET + ["--schedule", "window"], "needs --granularity block", None),
    ("score-unknown", TARGET + ["--score", "best"], "invalid choice", None),
    ("command-unknown", ["shrink", "--model", "random-llama:2"], "invalid choice", None),
    ("model-missing", ["candidates"], "--model", None),
    # model specs
    ("model-empty", ["candidates", "--model", ""], "empty model spec", None),
    ("random-llama-0", ["candidates", "--model", "random-llama:0"], "layer count", None),
    ("model-unknown", ["candidates", "--model", "no-such-model"], "unknown model spec", None),
    ("gguf-missing", ["candidates", "--model", "{w}/missing.gguf"], "no such GGUF file", None),
    ("gguf-100-zero-bytes", ["candidates", "--model", "{w}/m.gguf"], "not a GGUF file",
     lambda w: (w / "m.gguf").write_bytes(bytes(100))),
    ("gguf-truncated", ["candidates", "--model", "{w}/m.gguf"], "truncated",
     lambda w: (w / "m.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0\0")),
    ("gguf-bad-header", ["candidates", "--model", "{w}/m.gguf"], "corrupt or truncated",
     lambda w: (w / "m.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(76))),
    ("gguf-is-text", ["candidates", "--model", "{w}/m.gguf"], "not a GGUF file",
     lambda w: (w / "m.gguf").write_text("hello\n" * 20)),
    ("dir-without-config", ["candidates", "--model", "{w}/hf"], "without config.json",
     lambda w: hf_dir(w, config=None)),
    ("dir-config-not-json", ["candidates", "--model", "{w}/hf"], "not a JSON object",
     lambda w: hf_dir(w, config="{not json")),
    ("dir-not-causal-lm", ["candidates", "--model", "{w}/hf"], "is a vit model, not a causal language model",
     lambda w: hf_dir(w, config='{"model_type": "vit"}')),
    ("dir-safetensors-truncated", ["candidates", "--model", "{w}/hf"], "truncated",
     lambda w: hf_dir(w, weights=safetensors_bytes(64)[:-10])),
    ("dir-safetensors-garbage", ["candidates", "--model", "{w}/hf"], "corrupt",
     lambda w: hf_dir(w, weights=os.urandom(300))),
    ("pt-untrusted", ["candidates", "--model", "{w}/m.pt"], "--trust-checkpoint",
     lambda w: (w / "m.pt").write_bytes(b"\x80\x04N.")),
    ("pt-missing", ["candidates", "--model", "{w}/none.pt", "--trust-checkpoint"], "no such checkpoint", None),
    ("yaml-missing", ["candidates", "--model", "{w}/none.yaml"], "no such model YAML", None),
    ("plain-file", ["candidates", "--model", "{w}/notes.txt"], "cannot load as a model",
     lambda w: (w / "notes.txt").write_text("hi")),
    ("output-dir-as-base", ["candidates", "--model", "{w}/o1"], "depthprune output directory",
     lambda w: out_dir(w, weights=safetensors_bytes())),
    ("python-malformed", ["candidates", "--model", "python:onlymodule"], "python:MODULE:CALLABLE", None),
    ("python-no-module", ["candidates", "--model", "python:no_such_mod_xyz:make"], "no such module", None),
    ("python-import-raises", ["candidates", "--model", "python:boom_import:make"], "ZeroDivisionError",
     lambda w: module(w, "boom_import", "x = 1 / 0\n")),
    ("python-callable-raises", ["candidates", "--model", "python:boom_call:make"],
     "raised RuntimeError: no weights here",
     lambda w: module(w, "boom_call", "def make():\n    raise RuntimeError('no weights here')\n")),
    ("python-not-callable", ["candidates", "--model", "python:tiny:nothing"], "no callable",
     lambda w: module(w, "tiny", TINY)),
    ("python-returns-int", ["candidates", "--model", "python:rets:make"], "not an nn.Module",
     lambda w: module(w, "rets", "def make():\n    return 3\n")),
    ("python-inputs-wrong", ["candidates", "--model", "python:wrong_in:make"], "example inputs failed",
     lambda w: module(w, "wrong_in", TINY.replace("torch.zeros(1, 4)", "torch.zeros(1, 5)"))),
    # output directories given as --model (sparsify reads them)
    ("plan-empty-object", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "has no 'base'",
     lambda w: out_dir(w, plan="{}", weights=safetensors_bytes())),
    ("plan-not-object", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "not a plan object",
     lambda w: out_dir(w, plan="[]", weights=safetensors_bytes())),
    ("plan-not-json", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "not valid JSON",
     lambda w: out_dir(w, plan="{\"base\": ", weights=safetensors_bytes())),
    ("plan-base-int", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "'base' must be",
     lambda w: out_dir(w, plan=dict(PLAN, base=7), weights=safetensors_bytes())),
    ("plan-steps-wrong", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "'steps' must be",
     lambda w: out_dir(w, plan=dict(PLAN, steps={}), weights=safetensors_bytes())),
    ("plan-format-2", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "unsupported plan format",
     lambda w: out_dir(w, plan=dict(PLAN, format=2), weights=safetensors_bytes())),
    ("plan-python-base", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "--trust-code",
     lambda w: (module(w, "hostile", "open('PWNED', 'w').write('x')\ndef make():\n    pass\n"),
                out_dir(w, plan=dict(PLAN, base="python:hostile:make"), weights=safetensors_bytes()))),
    ("plan-pt-base", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5", "--trust-checkpoint"],
     "--trust-code",
     lambda w: ((w / "m.pt").write_bytes(b"\x80\x04N."),
                out_dir(w, plan=dict(PLAN, base=str(w / "m.pt")), weights=safetensors_bytes()))),
    ("weights-truncated", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "truncated",
     lambda w: out_dir(w, weights=safetensors_bytes(64)[:-1])),
    ("weights-empty", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "truncated",
     lambda w: out_dir(w, weights=b"")),
    ("weights-missing", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "has no model.safetensors",
     lambda w: out_dir(w)),
    ("sparsity-json-damaged", SPARSIFY[:2] + ["{w}/o1"] + SPARSIFY[3:] + ["--sparsity", "0.5"], "sparsity.json",
     lambda w: out_dir(w, weights=safetensors_bytes(), extra={"sparsity.json": "{\"added_bias\": 3}"})),
    # --out
    ("out-is-file", PRUNE[:4] + ["{w}/sentinel.txt"] + UNIT, "is an existing file", None),
    ("out-under-file", PRUNE[:4] + ["{w}/sentinel.txt/sub"] + UNIT, "is a file, not a directory", None),
    ("out-exists-no-force", PRUNE[:4] + ["{w}/o1"] + UNIT, "pass --force",
     lambda w: out_dir(w, weights=safetensors_bytes())),
    ("out-foreign-dir", PRUNE[:4] + ["{w}/around"] + UNIT, "not a depthprune output", None),
    ("out-foreign-dir-force", PRUNE[:4] + ["{w}/around", "--force"] + UNIT, "not a depthprune output", None),
    ("out-dot-force", PRUNE[:4] + [".", "--force"] + UNIT, "not a depthprune output", None),
    ("out-parent-force", PRUNE[:4] + ["..", "--force"] + UNIT, "not a depthprune output", None),
    ("out-cwd-output-force", PRUNE[:4] + [".", "--force"] + UNIT, "it is the current directory",
     lambda w: out_dir(w, weights=safetensors_bytes(), name="o1") or "o1"),
    ("out-is-model-force", ["sparsify", "--model", "{w}/o1", "--method", "magnitude", "--sparsity", "0.5",
                            "--out", "{w}/o1", "--force"],
     "it is the model being read", lambda w: out_dir(w, weights=safetensors_bytes())),
    ("out-holds-model-force", ["sparsify", "--model", "{w}/o1/inner", "--method", "magnitude", "--sparsity", "0.5",
                               "--out", "{w}/o1", "--force"], "contains the model being read",
     lambda w: (out_dir(w, weights=safetensors_bytes()), out_dir(w / "o1", weights=safetensors_bytes(),
                                                                 name="inner"))),
    ("graph-out-is-dir", ["graph", "--model", "random-llama:2", "--out", "{w}/around"], "is a directory", None),
    ("graph-out-exists", ["graph", "--model", "random-llama:2", "--out", "{w}/sentinel.txt"], "pass --force", None),
    ("demo-out-is-file", ["demo", "--out", "{w}/sentinel.txt"], "is an existing file", None),
    # calibration text and data
    ("calib-binary", TARGET + ["--calib", "{w}/blob.bin"], "binary file",
     lambda w: (w / "blob.bin").write_bytes(bytes(range(256)) * 4)),
    ("calib-not-utf8", TARGET + ["--calib", "{w}/latin1.txt"], "not UTF-8",
     lambda w: (w / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 50)),
    ("calib-empty", TARGET + ["--calib", "{w}/empty.txt"], "is empty",
     lambda w: (w / "empty.txt").write_text("  \n")),
    ("calib-directory", TARGET + ["--calib", "{w}/around"], "is a directory", None),
    ("calib-missing", TARGET + ["--calib", "{w}/none.txt"], "no such file", None),
    ("calib-unknown-play", TARGET + ["--calib", "shakespeare:nosuchplay"], "no play", None),
    ("seq-len-beyond-context", TARGET + ["--seq-len", "300"], "longer than random-llama:2's context of 256", None),
    ("data-missing", ["prune", "--model", "yolov5n.yaml", "--target", "0.1", "--data", "{w}/none.yaml",
                      "--out", "{w}/out"], "no such dataset YAML", None),
]


def _fmt(argv: list[str], w: Path) -> list[str]:
    return [a.replace("{w}", str(w)) for a in argv]


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case, tmp_path):
    name, argv, contains, setup = case
    w = tmp_path / "work"
    w.mkdir()
    (w / "sentinel.txt").write_text("keep me\n")
    (w / "around").mkdir()
    (w / "around" / "sentinel.txt").write_text("keep me too\n")
    cwd = w
    if setup is not None:
        sub = setup(w)
        if isinstance(sub, str):
            cwd = w / sub
    before = snapshot(tmp_path)
    env = cli_env([w / "mods"], DEPTHPRUNE_CACHE=str(tmp_path.parent / f"{tmp_path.name}-cache"))
    r = run_cli(_fmt(argv, w), cwd=cwd, env=env)
    assert_one_line_error(r, contains)
    assert snapshot(tmp_path) == before
    assert not (w / "PWNED").exists() and not (cwd / "PWNED").exists()


@pytest.mark.integration
def test_unwritable_out_is_found_before_any_work(tmp_path):
    """An ``--out`` in a directory the user cannot write: refused before the model is loaded.
    As root, permissions do not apply; an immutable directory (chattr +i) stands in."""
    w = tmp_path / "ro"
    w.mkdir()
    (w / "sentinel.txt").write_text("keep me\n")
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(w)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i")
        undo = ["chattr", "-i", str(w)]
    else:
        w.chmod(0o555)
        undo = None
    try:
        before = snapshot(tmp_path)
        r = run_cli(["prune", "--model", "smollm2-135m", "--target", "0.2", "--out", str(w / "out")])
        assert_one_line_error(r, "no write permission")
        assert snapshot(tmp_path) == before
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            w.chmod(0o755)


@pytest.mark.unit
def test_the_table_is_large_enough_and_unique():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 30


@pytest.mark.unit
def test_cli_choice_names_are_the_library_names():
    """The CLI keeps the choice names itself so that --help imports no torch; they must stay equal."""
    from depthprune.cli import args as cli_args
    from depthprune.importance import BUDGETS, EFFORTS, GRANULARITIES, SCHEDULES, SCORES
    from depthprune.sparsity import METHODS
    assert (cli_args.SCORES, cli_args.SCHEDULES, cli_args.GRANULARITIES, cli_args.EFFORTS, cli_args.METHODS,
            cli_args.BUDGETS) == (SCORES, tuple(SCHEDULES), GRANULARITIES, EFFORTS, METHODS, BUDGETS)
    # and `finetune --lr0`'s default is the library's recovery learning rate
    from depthprune.adapters.yolo_train import RECOVERY_LR0
    from depthprune.cli import build_parser
    args = build_parser().parse_args(["finetune", "--model", "m", "--data", "d.yaml", "--out", "o"])
    assert args.lr0 == RECOVERY_LR0


@pytest.mark.unit
def test_help_and_argument_errors_import_no_heavy_library(tmp_path):
    bad = tmp_path / "bad"  # a directory whose plan is not a depthprune plan: refused before torch loads
    bad.mkdir()
    (bad / "plan.json").write_text("{}")
    code = ("import sys\nfrom depthprune.cli import main\n"
            "codes = [main(['--help']), main(['prune', '--help']), main(['prune', '--model', 'x', '--batch-size', '0',"
            f" '--out', 'y']), main(['eval', {str(bad)!r}]), main(['export', {str(bad)!r}, '--format', 'hf', '--out', "
            f"{str(tmp_path / 'e')!r}])]\n"
            "heavy = [m for m in ('torch', 'torch_pruning', 'transformers', 'ultralytics', 'tqdm') if m in sys.modules]\n"
            "print(codes, heavy)")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2, 2] []"
    assert r.stderr.count("has no 'base'") == 2


def test_output_closed_early_is_no_error():
    """`depthprune candidates ... | head -0`: the reader is gone before the first line is
    written (closed while the command still imports); no traceback, exit 0."""
    p = start_cli(["candidates", "--model", "random-llama:2"])
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert err == ""
