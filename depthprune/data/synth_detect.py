"""A synthetic object-detection dataset in ultralytics format, made here from a seed.

No labelled detection images can be fetched on the machines this project is built on, so the
project draws its own: flat-coloured shapes (circle, square, triangle, cross, star, hexagon) of
varied size, colour, rotation and position, partly overlapping and partly cut by the image
border, on textured, cluttered backgrounds. Object sizes are log-uniform from about 12 px to 0.6 of
the image, so all three detection levels of a YOLO head (strides 8, 16, 32) have objects.

Every label is the bounding box of the object's *visible* pixel mask (after clipping to the image
and after later objects are drawn over it), so labels match exactly what was drawn. A placement
that would hide more than half of an earlier object is rejected and drawn elsewhere.

Numpy and PIL only; deterministic from the seed (each image has its own random stream).
"""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError
from ..io.outdir import OutputDir, fault_hold, is_depthprune_output

SHAPES = ("circle", "square", "triangle", "cross", "star", "hexagon")
MIN_OBJECT_PX = 12          # smallest circumscribed diameter, in pixels
MAX_OBJECT_FRACTION = 0.6   # largest circumscribed diameter, as a fraction of the image side
MAX_OBJECTS = 8             # objects per image: 1..MAX_OBJECTS
MIN_VISIBLE = 0.5           # fraction of an object's full area that must stay visible
JPEG_QUALITY = 92
MAX_IMGSZ = 4096            # largest image side (an image is drawn in memory as float32 layers)


@dataclass(frozen=True)
class DrawnObject:
    """One drawn shape: class index, RGB colour, and its visible pixel mask (H x W bool)."""

    cls: int
    colour: tuple[int, int, int]
    mask: np.ndarray

    def box(self) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` of the visible mask, ``x1``/``y1`` exclusive."""
        return mask_box(self.mask)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` of the True pixels of an H x W mask (ends exclusive)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` (pixels) centred at ``(cx, cy)``, rotated by ``angle``."""
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif kind == "star":
        pts = [(rr * math.cos(a), rr * math.sin(a))
               for k in range(10) for rr, a in [((1.0 if k % 2 == 0 else 0.45), -math.pi / 2 + k * math.pi / 5)]]
    elif kind == "cross":
        w = 0.3  # half arm width, relative to r (arm tips at distance ~1 from the centre)
        L = math.sqrt(1 - w * w)
        pts = [(w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w), (-w, -L), (w, -L), (w, -w),
               (L, -w), (L, w)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shape_mask(kind: str, imgsz: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    m = Image.new("L", (imgsz, imgsz), 0)
    d = ImageDraw.Draw(m)
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        d.polygon(_polygon(kind, cx, cy, r, angle), fill=255)
    return np.asarray(m) > 0


def _smooth_noise(rng: np.random.Generator, imgsz: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1] at ``cells`` x ``cells`` resolution, bicubically upsampled (H x W float)."""
    low = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((imgsz, imgsz), Image.BICUBIC), dtype=np.float32) / 255


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """A textured, cluttered background (H x W x 3 float, 0..255): a colour gradient, multi-scale
    texture, soft blobs and thin lines of random colours."""
    yy, xx = np.mgrid[0:imgsz, 0:imgsz].astype(np.float32) / imgsz
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    img = c0 + (c1 - c0) * (ramp - ramp.min()) / max(1e-6, float(ramp.max() - ramp.min()))
    for cells, amp in ((4, 40.0), (16, 25.0), (64, 15.0)):
        tex = np.stack([_smooth_noise(rng, imgsz, cells) for _ in range(3)], -1) - 0.5
        img = img + amp * rng.uniform(0.3, 1.0) * tex
    clutter = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    blobs = Image.new("RGB", (imgsz, imgsz))
    alpha = Image.new("L", (imgsz, imgsz), 0)
    db, da = ImageDraw.Draw(blobs), ImageDraw.Draw(alpha)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(0, imgsz, 2)
        rx, ry = rng.uniform(0.03, 0.2, 2) * imgsz
        box = (x - rx, y - ry, x + rx, y + ry)
        db.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        da.ellipse(box, fill=int(rng.integers(60, 140)))
    alpha = alpha.filter(ImageFilter.GaussianBlur(imgsz / 40))
    clutter = Image.composite(blobs, clutter, alpha)
    d = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(3, 12))):
        pts = [tuple(float(v) for v in rng.uniform(-0.1, 1.1, 2) * imgsz) for _ in range(int(rng.integers(2, 5)))]
        d.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    return np.asarray(clutter, dtype=np.float32)


def _colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A colour that stands out from ``under`` (the mean background colour beneath the shape)."""
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if np.abs(c - under).sum() > 150:
            break
    return tuple(int(v) for v in c)


def render_scene(rng: np.random.Generator, imgsz: int = 320, classes: int = 4
                 ) -> tuple[np.ndarray, list[DrawnObject]]:
    """Draw one image; returns ``(image, objects)``: ``image`` is H x W x 3 uint8 RGB, noise-free
    (each visible shape pixel is exactly its colour), ``objects`` the drawn shapes with their
    visible masks, in drawing order."""
    img = _background(rng, imgsz)
    objects: list[DrawnObject] = []
    lo, hi = math.log(MIN_OBJECT_PX), math.log(MAX_OBJECT_FRACTION * imgsz)
    # Larger shapes first, so that smaller ones drawn over them rarely hide too much of them.
    radii = np.sort(np.exp(rng.uniform(lo, hi, int(rng.integers(1, MAX_OBJECTS + 1)))) / 2)[::-1]
    for r0 in radii:
        for attempt in range(30):
            cls = int(rng.integers(0, classes))
            r = float(r0) * (0.9 ** (attempt // 10))  # shrink a little when it does not fit
            cx, cy = rng.uniform(-0.3 * r, imgsz + 0.3 * r, 2)
            angle = rng.uniform(0, 2 * math.pi)
            mask = _shape_mask(SHAPES[cls], imgsz, cx, cy, r, angle)
            if not mask.any():
                continue
            side = int(2 * r) + 4  # the whole shape, unclipped, on its own canvas
            full = _shape_mask(SHAPES[cls], side, side / 2 + cx % 1, side / 2 + cy % 1, r, angle).sum()
            if mask.sum() < MIN_VISIBLE * full:
                continue  # mostly outside the image
            if all((o.mask & ~mask).sum() >= MIN_VISIBLE * o.mask.sum() for o in objects):
                break
        else:
            continue  # no room left in this image
        colour = _colour(rng, img[mask].mean(0))
        img[mask] = colour
        objects = [DrawnObject(o.cls, o.colour, o.mask & ~mask) for o in objects]
        objects.append(DrawnObject(cls, colour, mask))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def add_sensor_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """``image`` (H x W x 3 uint8) plus Gaussian noise of a random level (sigma 2..8), as uint8."""
    noisy = image + rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def label_lines(objects: list[DrawnObject], imgsz: int) -> list[str]:
    """Ultralytics label lines ``cls xc yc w h`` (normalised to [0, 1]) of the visible boxes."""
    lines = []
    for o in objects:
        x0, y0, x1, y1 = o.box()
        lines.append(f"{o.cls} {(x0 + x1) / 2 / imgsz:.6f} {(y0 + y1) / 2 / imgsz:.6f} "
                     f"{(x1 - x0) / imgsz:.6f} {(y1 - y0) / imgsz:.6f}")
    return lines


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of how many images the other split has."""
    return np.random.default_rng([seed, ("train", "val").index(split), index])


def make_synth_detect(out: str, seed: int = 0, train: int = 600, val: int = 150, imgsz: int = 320,
                      classes: int = 4, force: bool = False) -> str:
    """Write the dataset to directory ``out``: ``images/{train,val}/*.jpg``, ``labels/{train,val}/*.txt``
    and ``data.yaml`` (paths relative to the YAML's directory, class names). Returns the path of
    ``data.yaml``.

    ``out`` is a depthprune output directory (`depthprune.io.outdir.OutputDir`): checked before any
    work, locked, written into a temporary sibling that an interrupt (SIGINT, SIGTERM) removes,
    marked as depthprune's and renamed into place when complete. It must not exist unless
    ``force``, and then only as a depthprune output (one this function or another command wrote),
    never the current directory or one holding it."""
    if not 1 <= classes <= len(SHAPES):
        raise UserError(f"classes must be between 1 and {len(SHAPES)}, got {classes}")
    if train < 1 or val < 1:
        raise UserError(f"need at least one train and one val image, got train={train} val={val}")
    if imgsz < 64 or imgsz % 32 or imgsz > MAX_IMGSZ:
        raise UserError(f"imgsz must be a multiple of 32 from 64 to {MAX_IMGSZ}, got {imgsz}")
    if seed < 0:
        raise UserError(f"seed must be 0 or more, got {seed}")
    if os.path.isdir(out) and not os.path.islink(out) and not is_depthprune_output(out):
        raise UserError(f"{out} exists and is not a dataset made here (no depthprune marker); choose a new "
                        "directory (--force replaces only depthprune outputs)")
    with OutputDir(out, force=force, command="data synth-detect") as od:
        _remove_old_temporaries(od.path)
        tmp = str(od.tmp)
        with od.writing():  # a full disk or a read-only file system: one line, nothing left
            for split, n in (("train", train), ("val", val)):
                os.makedirs(os.path.join(tmp, "images", split))
                os.makedirs(os.path.join(tmp, "labels", split))
                for i in range(n):
                    rng = image_rng(seed, split, i)
                    image, objects = render_scene(rng, imgsz, classes)
                    Image.fromarray(add_sensor_noise(rng, image)).save(
                        os.path.join(tmp, "images", split, f"{i:05d}.jpg"), quality=JPEG_QUALITY)
                    with open(os.path.join(tmp, "labels", split, f"{i:05d}.txt"), "w") as f:
                        f.write("".join(line + "\n" for line in label_lines(objects, imgsz)))
                    if split == "train" and i == 0:
                        fault_hold("write")  # tests: a signal while the dataset is half written
        names = "".join(f"  {k}: {SHAPES[k]}\n" for k in range(classes))
        od.write({"data.yaml": f"{YAML_HEADER} --seed {seed} --train {train} --val {val} "
                               f"--imgsz {imgsz} --classes {classes}\n"
                               "# paths are relative to this file's directory (no `path:` key)\n"
                               f"train: images/train\nval: images/val\nnames:\n{names}"})
        path = od.commit()
    return os.path.join(str(path), "data.yaml")


#: the first line of every data.yaml written here (followed by the arguments)
YAML_HEADER = "# depthprune data synth-detect"
_OLD_TMP = re.compile(r"[a-z0-9_]{8}")
_OLD_FILE = re.compile(r"\d{5}\.(jpg|txt)")


def _remove_old_temporaries(path: Path) -> list[Path]:
    """Remove what runs of earlier versions left beside ``path`` when killed: hidden siblings
    ``.NAME.XXXXXXXX`` (``tempfile.mkdtemp``) holding nothing but a half-written synthetic
    dataset (``images``/``labels`` with ``train``/``val`` of numbered ``.jpg``/``.txt`` files, and
    at most a ``data.yaml`` written here). Call only under the output's lock. Returns what it removed."""
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(prefix) and _OLD_TMP.fullmatch(e.name[len(prefix):]) and _is_old_temporary(e):
            shutil.rmtree(e, ignore_errors=True)
            removed.append(e)
    return removed


def _is_old_temporary(d: Path) -> bool:
    try:
        if d.is_symlink() or not d.is_dir():
            return False
        for top in d.iterdir():
            if top.name == "data.yaml" and top.is_file() and not top.is_symlink():
                with open(top, encoding="utf-8", errors="replace") as f:
                    if not f.readline().startswith(YAML_HEADER):
                        return False
                continue
            if top.name not in ("images", "labels") or top.is_symlink() or not top.is_dir():
                return False
            suffix = ".jpg" if top.name == "images" else ".txt"
            for split in top.iterdir():
                if split.name not in ("train", "val") or split.is_symlink() or not split.is_dir():
                    return False
                for f in split.iterdir():
                    if not (_OLD_FILE.fullmatch(f.name) and f.name.endswith(suffix) and f.is_file()
                            and not f.is_symlink()):
                        return False
    except OSError:
        return False
    return True
