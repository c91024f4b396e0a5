"""bench/yolo.py end to end on tiny settings: the table has every row and column, each model
lands within one unit of its target, and the parameters reported are the model's own."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["config", "target", "params", "reduction", "GFLOPs", "latency (ms)", "speed-up", "mAP50", "mAP50-95", "kept"]


def test_bench_yolo_tiny_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "YOLO_CONFIG_DIR": str(tmp_path / "yolo"),
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "yolo.py"), "--tiny", "--data-dir", str(tmp_path / "data"),
                          "--json", str(tmp_path / "rows.json"), "--save", str(tmp_path / "models"),
                          "--plot", str(tmp_path / "yolo.png"), "--finetune-epochs", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == COLUMNS
    table = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [(r[0], r[1]) for r in table] == [("dense", "0%")] + [(c + ft, "10%") for c in ("full", "reduced", "width",
                                                                                             "random") for ft in ("", "+ft")]
    # fine-tuning trains weights, never the structure
    assert all(r[2] == t[2] for r, t in zip(table[1::2], table[2::2]))
    assert "+ft: fine-tuned 1 epochs" in out.stdout
    assert re.search(r"\b1 thread\(s\)", out.stdout)
    rows = json.loads((tmp_path / "rows.json").read_text())
    dense = rows["dense_params"]
    for printed, r in zip(table, rows["rows"]):
        assert printed[0] == r["config"] and int(printed[2].replace(",", "")) == r["params"]
        # the parameters reported are those of the model itself, counted from its saved tensors
        with safe_open(str(tmp_path / "models" / f"{r['config']}-{r['target']:g}.safetensors"), "pt") as f:
            assert sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()) == r["params"]
        assert r["reduction"] == pytest.approx(1 - r["params"] / dense)
        # reached the target, and by less than the last unit (one move of the method) removes
        assert r["reached"] and (r["target"] == 0 or r["target"] <= r["reduction"] < r["target"] + r["last_unit_params"] / dense)
        assert 0 <= r["mAP50-95"] <= r["mAP50"] <= 1 and r["gflops"] > 0 and r["latency_ms"] > 0
    assert rows["rows"][0]["params"] == dense and rows["rows"][0]["kept"] == 1.0
    assert rows["rows"][0]["mAP50-95"] > 0.3  # the shipped detector detects
    assert (tmp_path / "yolo.png").stat().st_size > 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
