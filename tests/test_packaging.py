"""A regular (non-editable) install behaves like the source tree: recipes are package data."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cli_run import REPO

IGNORE = shutil.ignore_patterns(".git", ".venv", ".cache", ".pytest_cache", "__pycache__", "build", "dist",
                                "*.egg-info", "out")


@pytest.mark.unit
def test_recipes_are_package_data():
    from depthprune.adapters.recipes import load_recipe, recipe_names
    assert {"llama", "yolov5"} <= set(recipe_names())
    assert load_recipe("yolov5")["exclude_classes"] == ["Detect"]
    assert (REPO / "models" / "recipes" / "yolov5.yaml").is_file() and not (REPO / "depthprune" / "recipes").exists()


@pytest.mark.unit
def test_every_package_is_listed_for_the_wheel():
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "depthprune").rglob("__init__.py")}
    assert listed == found | {"depthprune.models"}


@pytest.mark.slow
def test_wheel_install_outside_the_source_tree_prunes_yolo_without_its_head(tmp_path):
    # build the wheel from a copy, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    (wheel,) = dist.glob("depthprune-*.whl")
    # a fresh venv whose own site-packages gets the wheel; the heavy dependencies come from the
    # running environment through a .pth line (plain paths: its own .pth files, such as an
    # editable depthprune, are not processed)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    shared = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    (purelib / "shared_deps.pth").write_text("\n".join(dict.fromkeys(shared)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(YOLO_CONFIG_DIR=str(tmp_path / "yolo"), YOLO_VERBOSE="False", PYTHONDONTWRITEBYTECODE="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=run_dir, env=env, capture_output=True, text=True, timeout=900)

    where = run(str(py), "-c", "import depthprune; print(depthprune.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout  # the wheel, not the checkout
    exe = str(venv / "bin" / "depthprune")
    r = run(exe, "candidates", "--model", "yolov5n.yaml", "--json", "-q")
    assert r.returncode == 0, r.stderr
    cands = json.loads(r.stdout)
    head = [u for u in cands["units"] if u["unit"].startswith("model.24.")]
    assert head and not any(u["candidate"] for u in head)
    assert all(u["reason"].startswith("excluded by recipe") for u in head)
    assert cands["summary"]["candidates"] == 50
    unit = next(u["unit"] for u in cands["units"] if u["candidate"] and u["in_width"] == u["out_width"])
    r = run(exe, "prune", "--model", "yolov5n.yaml", "--units", unit, "--out", "pruned", "-q")
    assert r.returncode == 0, r.stderr
    plan = json.loads((run_dir / "pruned" / "plan.json").read_text())
    assert [s["unit"] for s in plan["steps"]] == [unit] and plan["recipe"]["exclude_classes"] == ["Detect"]
