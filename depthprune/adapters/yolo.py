"""Ultralytics YOLO detection models (built from a model `.yaml`, or a trusted `.pt`).

Two things are settled here before ultralytics is first imported (`ultralytics_env`): it stays
offline (``YOLO_OFFLINE``: no DNS look-up at import, no telemetry, no font download) and keeps its
settings in a directory private to the user. And every model YAML handed to ultralytics goes
through one gate (`detection_model`): ultralytics evaluates a YAML's ``activation:`` text as
Python and calls whatever its layer names resolve to, so only plain ``torch.nn`` activations and
known layer classes pass without ``trust_code`` (the CLI's ``--trust-code``).
"""
from __future__ import annotations

import ast
import copy
import os
import stat
import sys
from pathlib import Path

import torch

from ..depth.identity import PrunedModule
from ..errors import SpecError, UserError
from .base import LoadedModel
from .recipes import load_recipe
from .yolo_weights import PACKAGED_DETECTORS, is_detector_dir, load_detector


# --------------------------------------------------------------------------- ultralytics' environment
_TRUE = {"1", "true", "yes", "on", "y", "t"}  # what ultralytics' env_bool reads as true
#: ultralytics settings that send data elsewhere; off in the private settings depthprune keeps
_NETWORK_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "wandb")
_env_ready = False


def yolo_config_dir() -> Path | None:
    """The private ultralytics settings directory: ``yolo`` in the depthprune user cache
    (``$DEPTHPRUNE_CACHE``, else ``~/.cache/depthprune``), mode 0700, owned by this user.
    None when it cannot be made or is not safely ours (a symbolic link, another owner)."""
    from .packaged import cache_dir
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


def _short(v) -> str:
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
        raise _trust_hint(source, f"activation {_short(act)} is not a plain torch.nn activation "
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
            raise SpecError(f"{source}: layer {i} is {_short(layer)}, not [from, repeats, module, args]")
        name = layer[2]
        if i == 0 and name == "Silence":
            continue  # YOLOv9's first layer: ultralytics puts nn.Identity in its place
        cls = _layer_class(name)
        if cls is None:
            raise SpecError(f"{source}: layer {i} names {_short(name)}, not an ultralytics or torch.nn layer")
        if not _is_layer(cls, name):
            why = "it downloads and unpickles weights" if name in _FETCHING_LAYERS else "not a layer class"
            raise _trust_hint(source, f"layer {i} names {_short(name)}, which ultralytics would call ({why})")
    return cfg


def detection_model(cfg, source: str, trust_code: bool = False, verbose: bool = False):
    """Build an ultralytics ``DetectionModel`` from a model YAML (a path or name ultralytics
    resolves, such as ``yolov5n.yaml``, or an already-read dict) through `check_model_yaml`:
    the one place depthprune hands a model YAML to ultralytics. A dict is copied, not changed.
    `SpecError` (one line) for a refused or malformed YAML."""
    ultralytics_env()
    from ultralytics.nn.tasks import DetectionModel, guess_model_scale, yaml_model_load
    from ultralytics.utils import YAML
    from . import _one_line
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
            raise SpecError(f"cannot read ultralytics model YAML {source!r}: {_one_line(e)}") from None
    else:
        cfg = copy.deepcopy(cfg)
    check_model_yaml(cfg, source, trust_code)
    try:
        return DetectionModel(cfg, verbose=verbose)
    except UserError:
        raise  # a bound the caller set on the build (`io.self_contained.bounded_build`)
    except Exception as e:  # ultralytics raises many kinds for a wrong YAML
        raise SpecError(f"cannot build ultralytics model {source!r}: {_one_line(e)}") from None


def _detections(model, inputs):
    """The inference output only; the auxiliary raw feature maps also returned in eval mode
    are not fixed-width model outputs. ``inputs``: ``(images,)`` or a labelled batch dict."""
    out = model(inputs["img"]) if isinstance(inputs, dict) else model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def output_energy_loss(model, batch) -> torch.Tensor:
    """Label-free Taylor fallback for detectors: half the mean squared detection output.

    Without labelled images there is no training loss; any loss that compares the model with
    its own dense predictions has zero gradient at the dense weights, so this measures how
    much each weight drives the outputs instead. A weak proxy: pass labelled data when you
    have it (``--data``, `detection_loss`)."""
    out = _detections(model, batch)
    return 0.5 * out.float().pow(2).mean()


def detection_loss(model, batch: dict) -> torch.Tensor:
    """The ultralytics training loss (box + classification + DFL, summed over the batch) on a
    labelled batch from `detection_batches`. Gains come from the checkpoint's training
    arguments when it has them, else ultralytics' defaults."""
    ultralytics_env()
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import IterableSimpleNamespace
    if not isinstance(getattr(model, "args", None), IterableSimpleNamespace):
        train_args = model.args if isinstance(getattr(model, "args", None), dict) else {}
        model.args = get_cfg(overrides={k: train_args[k] for k in ("box", "cls", "dfl") if k in train_args})
        model.criterion = None
    loss, _ = model.loss(batch)
    return loss.sum()


def detection_batches(lm: LoadedModel, data: str, samples: int, batch_size: int = 8) -> list[dict]:
    """Labelled calibration batches: the first ``samples`` images of an ultralytics dataset YAML
    (its ``val`` split, else ``train``), letterboxed to the model's input size without augmentation."""
    ultralytics_env()
    nc, imgsz = lm.model.model[-1].nc, lm.example_inputs[0].shape[-1]
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    if not os.path.isfile(data):
        raise SpecError(f"no such dataset YAML: {data}")
    try:
        info = check_det_dataset(data, autodownload=False)
    except Exception as e:  # ultralytics raises many kinds for a bad YAML or missing images
        raise SpecError(f"cannot use dataset {data}: {e}") from None
    if info["nc"] != nc:
        raise SpecError(f"dataset {data} has {info['nc']} classes, the model detects {nc}")
    split = info.get("val") or info.get("train")
    try:
        ds = build_yolo_dataset(get_cfg(overrides={"imgsz": imgsz, "task": "detect"}), split, batch_size, info,
                                mode="val", stride=32)
    except Exception as e:
        raise SpecError(f"cannot read images of {data}: {e}") from None
    n = min(samples, len(ds))
    batches = []
    for i in range(0, n, batch_size):
        b = ds.collate_fn([ds[j] for j in range(i, min(i + batch_size, n))])
        batches.append({"img": b["img"].float() / 255, "batch_idx": b["batch_idx"], "cls": b["cls"],
                        "bboxes": b["bboxes"]})
    return batches


def calibration_images(n: int = 4, imgsz: int = 640) -> list[tuple[torch.Tensor]]:
    """Batches of one image each from the images ultralytics ships (bus, zidane), resized to
    ``imgsz`` square, with horizontal flips and crops for more than two."""
    from PIL import Image
    ultralytics_env()
    from ultralytics.utils import ASSETS
    files = sorted(p for p in ASSETS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SpecError("no sample images found in the ultralytics package")
    out = []
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB")
        k = i // len(files)
        if k % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if k >= 2:
            w, h = img.size
            img = img.crop((w // 8 * (k // 2 % 4), 0, w, h))
        img = img.resize((imgsz, imgsz))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(imgsz, imgsz, 3)
        out.append((x.permute(2, 0, 1).float().div(255).unsqueeze(0),))
    return out


def describe(lm: LoadedModel) -> dict:
    """The architecture of an ultralytics model as data: its model YAML and input size."""
    return {"kind": "ultralytics", "yaml": lm.model.yaml, "imgsz": int(lm.example_inputs[0].shape[-1])}


def build(desc: dict, spec: str, trust_code: bool = False) -> LoadedModel:
    """An ultralytics detection model built from the described YAML (random weights); its YAML
    goes through `check_model_yaml` (``trust_code`` lets code in it run)."""
    imgsz = desc.get("imgsz", 640)
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or not 32 <= imgsz <= 8192:
        raise SpecError(f"{spec}: the described input size {_short(imgsz)} is not a whole number of pixels "
                        "from 32 to 8192")
    model = detection_model(desc.get("yaml"), f"{spec} (base model YAML)", trust_code)
    return _wrap(_prepare(model), spec, imgsz)


def _wrap(model, spec: str, imgsz: int) -> LoadedModel:
    return LoadedModel(model=model, example_inputs=_example_inputs(imgsz), spec=spec, family="yolo",
                       forward_fn=_detections,
                       recipe=load_recipe("yolov5"), loss_fn=output_energy_loss,
                       labelled_batches=detection_batches, labelled_loss_fn=detection_loss)


def trainable_as_built(model: torch.nn.Module) -> None:
    """Give every parameter the ``requires_grad`` a freshly built ultralytics model has: all
    trainable but the DFL's fixed projection conv. Trained checkpoints store the EMA copy with
    every flag False, which would otherwise read as "frozen" to the engine and to Taylor."""
    ultralytics_env()
    from ultralytics.nn.modules.block import DFL
    fixed = {id(p) for m in model.modules() if isinstance(m, DFL) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in fixed)


def fuse_stand_ins(model: torch.nn.Module) -> list[str]:
    """Put each ultralytics ``Conv`` block whose conv or BatchNorm was pruned into the form that
    ``fuse()`` gives a block: ``act(conv(x))`` with no ``bn`` attribute (exact in eval mode).

    Ultralytics' fuse folds ``bn`` into ``conv`` for every ``Conv`` that still has a ``bn``, and
    needs both to be real layers. A pruned block has a parameter-free stand-in in one or both
    places. Its new ``conv`` is ``bn`` after ``conv`` with identity stand-ins left out and a live
    BatchNorm written as the equivalent 1x1 depthwise convolution (per-channel scale and shift):
    with the BatchNorm pruned (or already folded) the conv stays as it is; with only the conv
    pruned, the BatchNorm's convolution takes its place. Blocks with both layers live are left
    for ultralytics to fuse. Returns the paths of the blocks put in fused form; `UserError` for
    block types whose fusion cannot skip a stand-in (``Conv2``, ``RepConv`` with pruned parts)."""
    ultralytics_env()
    from ultralytics.nn.modules.conv import Conv, Conv2, RepConv
    done = []
    for path, m in model.named_modules():
        if isinstance(m, RepConv) and any(isinstance(c, PrunedModule) for c in m.modules()):
            raise UserError(f"{path}: a RepConv with pruned parts cannot be fused")
        if not isinstance(m, Conv) or not hasattr(m, "bn"):
            continue
        if not (isinstance(m.conv, PrunedModule) or isinstance(m.bn, PrunedModule)):
            continue
        if isinstance(m, Conv2):
            raise UserError(f"{path}: a Conv2 with pruned parts cannot be fused")
        parts = [m.conv, m.bn if isinstance(m.bn, PrunedModule) else _batchnorm_as_conv(m.bn)]
        parts = [p for p in parts if not (isinstance(p, PrunedModule) and p.state == "identity")]
        if parts:
            m.conv = parts[0] if len(parts) == 1 else torch.nn.Sequential(*parts)
        delattr(m, "bn")
        m.forward = m.forward_fuse
        done.append(path)
    return done


@torch.no_grad()
def _batchnorm_as_conv(bn: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
    """The eval-mode BatchNorm as a 1x1 depthwise convolution with bias."""
    c = bn.num_features
    scale = (bn.weight if bn.affine else torch.ones(c)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros(c)) - bn.running_mean * scale
    conv = torch.nn.Conv2d(c, c, 1, groups=c, bias=True).to(bn.running_var)
    conv.weight.copy_(scale.reshape(c, 1, 1, 1))
    conv.bias.copy_(shift)
    return conv.requires_grad_(False)


class FuseWithStandIns:
    """``model.fuse`` of a model loaded here: `fuse_stand_ins`, then the class's own ``fuse``.
    A plain object holding the model (not a bound method), so the model still pickles and copies."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        fuse_stand_ins(self.model)
        return type(self.model).fuse(self.model, *args, **kwargs)


def _prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, construction-time ``requires_grad``, and a ``fuse()`` that accepts stand-ins
    (ultralytics' validator and exporter call ``model.fuse()``)."""
    trainable_as_built(model)
    model.fuse = FuseWithStandIns(model)
    return model.eval()


def _example_inputs(imgsz: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, imgsz, imgsz, generator=g),)


def _train_imgsz(train_args: dict | None) -> int | None:
    v = (train_args or {}).get("imgsz")
    if isinstance(v, (list, tuple)) and v:
        v = max(v)
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


def load_yolo(spec: str, trust_checkpoint: bool = False, imgsz: int | None = None,
              trust_code: bool = False) -> LoadedModel:
    """An ultralytics model ``.yaml`` (random weights), a pickled ``.pt`` checkpoint (only with
    ``trust_checkpoint``), a packaged detector name (`PACKAGED_DETECTORS`) or a detector directory
    (`load_detector`). Example inputs are ``imgsz`` square: by default the checkpoint's training
    size when it records one, else 640. A model YAML that would run code is refused unless
    ``trust_code`` (`check_model_yaml`)."""
    ultralytics_env()
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        raise SpecError("ultralytics models need the 'ultralytics' extra: pip install 'depthprune[ultralytics]'") from None
    from . import _one_line
    train_imgsz = None
    if spec in PACKAGED_DETECTORS or is_detector_dir(spec):
        model, meta = load_detector(PACKAGED_DETECTORS.get(spec, spec), trust_code=trust_code)
        train_imgsz = _train_imgsz(meta)
    elif spec.endswith((".yaml", ".yml")):
        model = detection_model(spec, spec, trust_code)
    else:
        if not os.path.isfile(spec):
            raise SpecError(f"no such checkpoint: {spec}")
        if not trust_checkpoint:
            raise SpecError(f"{spec} is a pickled ultralytics checkpoint; pass --trust-checkpoint "
                            "only if you trust its source")
        from ultralytics.nn.tasks import load_checkpoint
        try:
            model, ckpt = load_checkpoint(spec)
        except Exception as e:  # a damaged or foreign checkpoint
            raise SpecError(f"cannot load checkpoint {spec!r}: {_one_line(e)}") from None
        if not isinstance(model, DetectionModel):
            raise SpecError(f"{spec} holds a {type(model).__name__}, not an ultralytics detection model")
        model = model.float()
        train_imgsz = _train_imgsz(ckpt.get("train_args"))
    return _wrap(_prepare(model), spec, imgsz or train_imgsz or 640)
