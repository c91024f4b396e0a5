"""Issue 13's contracts over the architecture zoo (`tests/archs.py`, `tests/battery.py`).

Every listed candidate prunes alone with promise == drop and a model that runs with its output
shapes; random prune sequences hold the same at every step; for HF decoders, pruning every unit
of a block equals deleting it and the attention unit alone equals skipping the attention
sublayer (max |delta logit| <= 1e-5, fp32); the CLI ``python:`` route works on an HF model built
with its default config.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from archs import DECODERS, SLOW, ZOO
from battery import (EXACT, Report, attention_equivalence, block_equivalence, build_graph, list_candidates,
                     random_sequences, single_prunes)

ROOT = Path(__file__).resolve().parents[1]


def _zoo(names):
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in names]


_built: dict = {}


def session(name):
    """The zoo model, its base pruning session and its listed candidates (built once per name)."""
    if name not in _built:
        arch = ZOO[name]()
        report = Report(name, arch.kind)
        assert build_graph(arch, report) is not None, report.graph_error
        base, cands = list_candidates(arch, report)
        assert base is not None, report.graph_error
        _built[name] = (arch, base, cands, report)
    return _built[name]


@pytest.mark.integration
@pytest.mark.parametrize("name", _zoo(ZOO))
def test_every_candidate_alone(name):
    arch, base, cands, report = session(name)
    assert cands, "no candidates listed"
    report.single_failures, report.single_ok = [], 0
    single_prunes(arch, base, cands, report)
    assert report.single_failures == []


@pytest.mark.integration
@pytest.mark.parametrize("name", _zoo(ZOO))
def test_random_sequences(name):
    arch, base, _, report = session(name)
    report.sequence_failures = []
    random_sequences(arch, base, report, seeds=(0, 1, 2), steps=15)
    assert report.sequence_failures == []


@pytest.mark.integration
@pytest.mark.parametrize("name", _zoo(DECODERS))
def test_block_equals_deletion(name):
    arch, base, _, report = session(name)
    report.equivalence_errors = []
    block_equivalence(arch, base, report)
    assert report.equivalence_errors == []
    assert report.block_diff <= EXACT


@pytest.mark.integration
@pytest.mark.parametrize("name", _zoo(DECODERS))
def test_attention_equals_sublayer_skip(name):
    arch, base, _, report = session(name)
    report.equivalence_errors = []
    attention_equivalence(arch, base, report)
    assert report.equivalence_errors == []
    assert report.attention_diff <= EXACT


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "depthprune.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)


@pytest.mark.integration
def test_cli_python_route_on_hf_default_config(tmp_path):
    """`python:MODULE:CALLABLE` returning an HF model with its default config (use_cache on)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    spec = "python:archs:qwen2_default"
    r = _cli("graph", "--model", spec, "--json", env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["attention"] == 2 and summary["transforms"] == 2 * 3 + 1
    r = _cli("candidates", "--model", spec, "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed["summary"]["candidates"] == 8
    units = [u for u in listed["units"] if u["candidate"]]
    pick = [units[0]["unit"], next(u["unit"] for u in units if u["kind"] == "attention")]
    out = tmp_path / "pruned"
    r = _cli("prune", "--model", spec, "--units", ",".join(pick), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in rep["units"]] == pick
    assert rep["params_before"] - rep["params_after"] == sum(u["params_removed"] for u in rep["units"])
