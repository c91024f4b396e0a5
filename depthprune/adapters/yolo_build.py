"""Ultralytics' environment and the one gate every model YAML passes before ultralytics reads it.

Settled before ultralytics is first imported (`ultralytics_env`): it stays offline
(``YOLO_OFFLINE``: no DNS look-up at import, no telemetry, no font download) and keeps its
settings in a directory private to the user. Every model YAML handed to ultralytics goes
through `detection_model`: ultralytics evaluates a YAML's ``activation:`` text as Python and
calls whatever its layer names resolve to, so only plain ``torch.nn`` activations and known
layer classes pass without ``trust_code`` (the CLI's ``--trust-code``).
"""
from __future__ import annotations

import ast
import copy
import os
import stat
import sys
from pathlib import Path

import torch

from ..errors import SpecError, UserError, one_line
from .packaged import cache_dir


# --------------------------------------------------------------------------- ultralytics' environment
_TRUE = {"1", "true", "yes", "on", "y", "t"}  # what ultralytics' env_bool reads as true
#: ultralytics settings that send data elsewhere; off in the private settings depthprune keeps
_NETWORK_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "wandb")
_env_ready = False


def yolo_config_dir() -> Path | None:
    """The private ultralytics settings directory: ``yolo`` in the depthprune user cache
    (``$DEPTHPRUNE_CACHE``, else ``~/.cache/depthprune``), mode 0700, owned by this user.
    None when it cannot be made or is not safely ours (a symbolic link, another owner)."""
    d = Path(os.path.abspath(cache_dir() / "yolo"))
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return None
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
    except OSError:
        return None
    return d


def ultralytics_env() -> None:
    """Settle ultralytics' environment; call before importing anything from ultralytics.

    - ``YOLO_OFFLINE=true`` (unless the user set it): ultralytics then makes no DNS look-up at
      import (its online check), sends no telemetry, installs and updates nothing; fonts it
      would download for plots are looked up locally only (`_local_font`).
    - ``YOLO_CONFIG_DIR`` (unless the user set it): `yolo_config_dir`, private to the user, its
      settings with ``sync`` and the network loggers off. Never a fixed shared path.
    - ``YOLO_VERBOSE=False`` (unless set): no banners on stdout.
    """
    global _env_ready
    if _env_ready:
        return
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_OFFLINE", "true")
    ours = False
    if not os.environ.get("YOLO_CONFIG_DIR") and "ultralytics.utils" not in sys.modules:
        d = yolo_config_dir()
        if d is not None:  # else ultralytics' own per-user choice (~/.config, or its private /tmp one)
            os.environ["YOLO_CONFIG_DIR"] = str(d)
            ours = True
    try:
        import ultralytics.utils as uu
        import ultralytics.utils.checks as checks
    except ImportError:
        return  # the caller reports the missing extra
    if ours:
        off = {k: False for k in _NETWORK_SETTINGS if uu.SETTINGS.get(k) is not False}
        if off:
            try:
                uu.SETTINGS.update(off)
            except (OSError, KeyError, TypeError):
                pass  # an unwritable or other-version settings file: offline all the same
    if checks.check_font is not _local_font:
        _local_font.download = checks.check_font
        checks.check_font = _local_font
        data_utils = sys.modules.get("ultralytics.data.utils")  # bound its own name at import
        if data_utils is not None and getattr(data_utils, "check_font", None) is _local_font.download:
            data_utils.check_font = _local_font
    _env_ready = True


def _local_font(font: str = "Arial.ttf"):
    """ultralytics' ``check_font`` without the download while offline: the font from the settings
    directory or matplotlib's list, else None (ultralytics then plots with PIL's default font;
    depthprune draws no plots with it). Dataset checks call it for every dataset YAML."""
    if os.environ.get("YOLO_OFFLINE", "").strip().lower() not in _TRUE:
        return _local_font.download(font)
    from ultralytics.utils import USER_CONFIG_DIR
    name = Path(font).name
    if (USER_CONFIG_DIR / name).exists():
        return USER_CONFIG_DIR / name
    try:
        from matplotlib import font_manager
    except ImportError:
        return None
    return next((f.fname for f in font_manager.fontManager.ttflist if font in f.fname and os.path.exists(f.fname)),
                None)


_local_font.download = None
_quiet_settings = ultralytics_env  # the older name


# --------------------------------------------------------------------------- the model-YAML gate
#: ``torch.nn`` activations a model YAML's ``activation:`` may name without ``trust_code``
SAFE_ACTIVATIONS = frozenset({
    "SiLU", "ReLU", "ReLU6", "LeakyReLU", "Hardswish", "Hardsigmoid", "Hardtanh", "GELU", "Mish", "Identity",
    "Sigmoid", "Tanh", "ELU", "SELU", "CELU", "PReLU", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid"})
#: layer classes whose construction downloads and unpickles weights: only with ``trust_code``
_FETCHING_LAYERS = frozenset({"TorchVision"})
_ACTIVATION_EXAMPLES = "nn.SiLU(), nn.ReLU(), nn.LeakyReLU(0.1), nn.Hardswish()"
_MAX_ACTIVATION_CHARS = 120


def short_repr(v) -> str:
    """``repr(v)`` on one line, at most 80 characters (a YAML value in a message)."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _trust_hint(source: str, what: str) -> SpecError:
    return SpecError(f"{source}: {what}; pass --trust-code only if you trust this model YAML")


def _plain_literal(node: ast.AST) -> bool:
    """A number, a boolean or a short string, optionally signed: nothing that names or calls."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
        return isinstance(node, ast.Constant) and type(node.value) in (int, float)
    return isinstance(node, ast.Constant) and (type(node.value) in (int, float, bool) or
                                               (type(node.value) is str and len(node.value) <= 16))


def is_safe_activation(text) -> bool:
    """True for ``nn.NAME(...)`` or ``torch.nn.NAME(...)`` with NAME in `SAFE_ACTIVATIONS` and
    only literal numbers, booleans or short strings as arguments (keywords allowed). Parsed, never
    evaluated."""
    if not isinstance(text, str) or len(text) > _MAX_ACTIVATION_CHARS:
        return False
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
        return False
    owner = call.func.value
    owner_ok = (isinstance(owner, ast.Name) and owner.id == "nn") or (
        isinstance(owner, ast.Attribute) and owner.attr == "nn" and isinstance(owner.value, ast.Name)
        and owner.value.id == "torch")
    return (owner_ok and call.func.attr in SAFE_ACTIVATIONS and all(_plain_literal(a) for a in call.args)
            and all(k.arg is not None and _plain_literal(k.value) for k in call.keywords))


def _layer_class(name: str):
    """What ultralytics' ``parse_model`` would call for the layer name ``name`` (resolved the way it
    resolves it, without calling anything), or None when the name resolves to nothing."""
    if name.startswith("nn."):
        return getattr(torch.nn, name[3:], None)
    if name.startswith("torchvision.ops."):
        import torchvision
        return getattr(torchvision.ops, name[16:], None)
    if "nn." in name:  # older ultralytics read any name holding "nn." as torch.nn.<name[3:]>
        return None
    ultralytics_env()
    import ultralytics.nn.tasks as tasks
    return vars(tasks).get(name)


def _is_layer(cls, name: str) -> bool:
    """A layer class a model YAML may name: a ``torch.nn`` layer, a torchvision op, or one of
    ultralytics' own layer modules (not its model classes, which read further files)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or name in _FETCHING_LAYERS:
        return False
    mod = getattr(cls, "__module__", "") or ""
    return mod.startswith(("torch.nn.modules.", "torchvision.ops.", "ultralytics.nn.modules."))


def check_model_yaml(cfg, source: str, trust_code: bool = False) -> dict:
    """Refuse (`SpecError`, one line) a model YAML dict whose building would run code it carries:
    an ``activation:`` other than a plain `SAFE_ACTIVATIONS` call (ultralytics evaluates it with
    ``eval``), or a layer that is not a layer class (ultralytics calls what the name resolves
    to with the YAML's arguments: a function, or a model class that reads another file). Layer
    arguments need no check: ultralytics reads them with ``ast.literal_eval``. With
    ``trust_code`` only the shape is checked. Returns ``cfg``."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{source}: not an ultralytics model YAML (a mapping with backbone and head)")
    if trust_code:
        return cfg
    act = cfg.get("activation")
    if act and not is_safe_activation(act):
        raise _trust_hint(source, f"activation {short_repr(act)} is not a plain torch.nn activation "
                                  f"({_ACTIVATION_EXAMPLES}, ...) and ultralytics runs it as Python code")
    layers = []
    for part in ("backbone", "head"):
        v = cfg.get(part)
        if not isinstance(v, list):
            raise SpecError(f"{source}: not an ultralytics model YAML ({part} must be a list of "
                            "[from, repeats, module, args])")
        layers += v
    for i, layer in enumerate(layers):
        if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)):
            raise SpecError(f"{source}: layer {i} is {short_repr(layer)}, not [from, repeats, module, args]")
        name = layer[2]
        if i == 0 and name == "Silence":
            continue  # YOLOv9's first layer: ultralytics puts nn.Identity in its place
        cls = _layer_class(name)
        if cls is None:
            raise SpecError(f"{source}: layer {i} names {short_repr(name)}, not an ultralytics or torch.nn layer")
        if not _is_layer(cls, name):
            why = "it downloads and unpickles weights" if name in _FETCHING_LAYERS else "not a layer class"
            raise _trust_hint(source, f"layer {i} names {short_repr(name)}, which ultralytics would call ({why})")
    return cfg


def detection_model(cfg, source: str, trust_code: bool = False, verbose: bool = False):
    """Build an ultralytics ``DetectionModel`` from a model YAML (a path or name ultralytics
    resolves, such as ``yolov5n.yaml``, or an already-read dict) through `check_model_yaml`:
    the one place depthprune hands a model YAML to ultralytics. A dict is copied, not changed.
    `SpecError` (one line) for a refused or malformed YAML."""
    ultralytics_env()
    from ultralytics.nn.tasks import DetectionModel, guess_model_scale, yaml_model_load
    from ultralytics.utils import YAML
    if isinstance(cfg, (str, os.PathLike)):
        try:
            if os.path.isfile(cfg):
                # the file named, as it is: ultralytics' name search would rename some names
                # (``...u.yaml`` loses its ``u``) and read another file, or none
                d = YAML.load(cfg)  # YAML's safe loader, as yaml_model_load reads
                cfg = {**d, "scale": guess_model_scale(cfg), "yaml_file": str(cfg)} if isinstance(d, dict) else d
            else:
                cfg = yaml_model_load(cfg)  # a name ultralytics ships (yolov5n.yaml & co)
        except Exception as e:  # a missing or unreadable file, bad YAML
            raise SpecError(f"cannot read ultralytics model YAML {source!r}: {one_line(e)}") from None
    else:
        cfg = copy.deepcopy(cfg)
    check_model_yaml(cfg, source, trust_code)
    try:
        return DetectionModel(cfg, verbose=verbose)
    except UserError:
        raise  # a bound the caller set on the build (`io.self_contained.bounded_build`)
    except Exception as e:  # ultralytics raises many kinds for a wrong YAML
        raise SpecError(f"cannot build ultralytics model {source!r}: {one_line(e)}") from None
