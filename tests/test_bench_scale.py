"""bench/scale.py end to end on a tiny Llama shape, in a subprocess: its figures are consistent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--layers", "2", "--vocab", "128",
        "--windows", "2", "--seq-len", "32"]


def run_bench(*extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), *TINY, *extra], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("JSON ")]
    assert len(line) == 1
    return json.loads(line[0][5:])


@pytest.mark.unit
def test_scale_bench_tiny_figures_are_consistent():
    o = run_bench("--sparsity", "wanda")
    h, i, v, layers = 64, 128, 128, 2
    block = 4 * h * h + 3 * h * i + 2 * h
    assert o["arithmetic"]["block"] == block
    assert o["params"] == o["arithmetic"]["total"] == 2 * v * h + h + layers * block
    assert o["model_bytes"] == 2 * o["params"]  # bf16
    # every unit scored: per block one attention operation and gate, up, down
    assert o["units"] == {"candidates": 4 * layers, "scored": 4 * layers, "outside_blocks": 0}
    assert sorted(o["scores"]) == sorted(f"model.layers.{b}.{u}" for b in range(layers)
                                         for u in ("self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert all(0 < s <= 1 for s in o["scores"].values())
    assert [r["units"] for r in o["per_block"]] == [4] * layers
    assert sum(r["seconds"] for r in o["per_block"]) <= o["phases"]["score"]["seconds"] + 1e-6
    peaks = [o["phases"][k]["peak_rss"] for k in ("build", "trace", "cache_block_states", "score", "sparsify")]
    assert peaks == sorted(peaks) and o["peak_rss"] >= peaks[-1]
    # wanda at 50 %: every Linear of the blocks (7 per block), half its weights zeroed
    sp = o["sparsify"]
    assert sp["mode"] == "block by block" and sp["layers"] == 7 * layers
    assert sp["sparsity_reported"] == pytest.approx(0.5, abs=0.01)
    dense_linear = layers * (4 * h * h + 3 * h * i)
    assert sp["nonzero_after"] == pytest.approx(o["params"] - dense_linear // 2, abs=dense_linear * 0.01)
