"""The synthetic detection dataset: deterministic, labels equal to what was drawn, sizes for P3-P5."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from depthprune.cli import main
from depthprune.data import make_synth_detect
from depthprune.data.synth_detect import SHAPES, _shape_mask, image_rng, label_lines, mask_box, render_scene
from depthprune.errors import UserError


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in (x for x in names if x != ".depthprune"):  # the output marker records a time
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synth_detect(str(root / "a"), seed=3, train=4, val=2, imgsz=160, classes=4)
    return root / "a"


@pytest.mark.unit
def test_same_seed_same_bytes_other_seed_differs(small_set, tmp_path):
    make_synth_detect(str(tmp_path / "b"), seed=3, train=4, val=2, imgsz=160, classes=4)
    make_synth_detect(str(tmp_path / "c"), seed=4, train=4, val=2, imgsz=160, classes=4)
    a, b, c = _files(str(small_set)), _files(str(tmp_path / "b")), _files(str(tmp_path / "c"))
    assert len(a) == 2 * (4 + 2) + 1
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if k != "data.yaml" and a[k] != c[k]]
    assert len(differing) == 2 * (4 + 2)  # every image and every label file


@pytest.mark.unit
def test_layout_and_label_format(small_set):
    import yaml
    with open(small_set / "data.yaml") as f:
        cfg = yaml.safe_load(f)
    assert "path" not in cfg  # ultralytics then resolves train/val against the YAML's directory
    assert cfg["train"] == "images/train" and cfg["val"] == "images/val"
    assert cfg["names"] == {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    lines = 0
    for split, n in (("train", 4), ("val", 2)):
        images = sorted(os.listdir(small_set / "images" / split))
        labels = sorted(os.listdir(small_set / "labels" / split))
        assert [os.path.splitext(x)[0] for x in images] == [os.path.splitext(x)[0] for x in labels]
        assert len(images) == n
        for name in images:
            assert Image.open(small_set / "images" / split / name).size == (160, 160)
        for name in labels:
            for line in (small_set / "labels" / split / name).read_text().splitlines():
                parts = line.split()
                assert len(parts) == 5
                assert parts[0].isdigit() and int(parts[0]) < 4
                xc, yc, w, h = map(float, parts[1:])
                assert 0 < w <= 1 and 0 < h <= 1
                assert -1e-6 <= xc - w / 2 and xc + w / 2 <= 1 + 1e-6
                assert -1e-6 <= yc - h / 2 and yc + h / 2 <= 1 + 1e-6
                lines += 1
    assert lines >= 6


@pytest.mark.unit
def test_shape_geometry():
    """A square of circumradius 10*sqrt(2) at (32, 32) covers pixels 22..42; rotated by 45 degrees
    its corners reach 32 +- 14.1."""
    m = _shape_mask("square", 64, 32, 32, 10 * math.sqrt(2), 0.0)
    x0, y0, x1, y1 = mask_box(m)
    assert (x0, y0) == (22, 22) and (x1, y1) in ((42, 42), (43, 43))
    m = _shape_mask("square", 64, 32, 32, 10 * math.sqrt(2), math.pi / 4)
    x0, y0, x1, y1 = mask_box(m)
    assert abs(x0 - (32 - 14.14)) <= 1 and abs(x1 - (32 + 14.14)) <= 2
    for kind in SHAPES:  # every shape is filled and centred
        m = _shape_mask(kind, 64, 32, 32, 20, 0.3)
        x0, y0, x1, y1 = mask_box(m)
        assert m[32, 32] and 10 <= x0 and x1 <= 54 and 10 <= y0 and y1 <= 54


@pytest.mark.unit
def test_labels_match_what_was_drawn(small_set):
    """The written labels and images are those of the scene drawn from the image's seed: each box is
    the tight box of the object's visible pixels, those pixels are exactly its colour in the
    noise-free image and close to it in the written JPEG (median), and far from the background around it."""
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            clean, objects = render_scene(image_rng(3, split, i), 160, 4)
            written = (small_set / "labels" / split / f"{i:05d}.txt").read_text().splitlines()
            assert written == label_lines(objects, 160)
            jpeg = np.asarray(Image.open(small_set / "images" / split / f"{i:05d}.jpg").convert("RGB"), dtype=float)
            drawn = np.zeros(clean.shape[:2], bool)
            for o in objects:
                x0, y0, x1, y1 = o.box()
                vis = o.mask
                assert vis[y0, x0:x1].any() and vis[y1 - 1, x0:x1].any()  # tight on all four sides
                assert vis[y0:y1, x0].any() and vis[y0:y1, x1 - 1].any()
                assert not vis[:y0].any() and not vis[y1:].any() and not vis[:, :x0].any() and not vis[:, x1:].any()
                assert (clean[vis] == np.array(o.colour)).all()
                drawn |= vis
            for o in objects:  # in the file, the shape stands out from the background around it
                x0, y0, x1, y1 = o.box()
                ring = np.zeros_like(drawn)
                ring[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = True
                ring &= ~drawn
                # JPEG subsamples chroma, which smears colour near edges: compare medians
                d_shape = np.abs(np.median(jpeg[o.mask], 0) - o.colour).sum()
                if o.mask.sum() >= 400:
                    assert d_shape < 30
                if ring.sum() > 20:
                    assert d_shape < 0.5 * np.abs(np.median(jpeg[ring], 0) - o.colour).sum()


@pytest.mark.unit
def test_sizes_cover_all_detection_levels():
    """Longer box sides (320 px images): a good share above imgsz/4 (P4/P5), some at least 128 px
    (P5, stride 32), and some below imgsz/16 (P3, stride 8)."""
    sides, per_image = [], []
    for i in range(40):
        _, objects = render_scene(image_rng(0, "train", i), 320, 4)
        per_image.append(len(objects))
        for o in objects:
            x0, y0, x1, y1 = o.box()
            sides.append(max(x1 - x0, y1 - y0))
    sides = np.array(sides)
    assert (sides > 320 / 4).mean() > 0.15
    assert (sides >= 128).sum() >= 5
    assert (sides < 320 / 16).mean() > 0.05
    assert 1 <= min(per_image) and max(per_image) <= 8 and np.mean(per_image) > 2.5


@pytest.mark.unit
def test_bad_arguments_and_existing_directory(small_set, tmp_path):
    with pytest.raises(UserError, match="classes"):
        make_synth_detect(str(tmp_path / "x"), classes=len(SHAPES) + 1)
    with pytest.raises(UserError, match="multiple of 32"):
        make_synth_detect(str(tmp_path / "x"), imgsz=100)
    with pytest.raises(UserError, match="exists"):
        make_synth_detect(str(small_set), train=1, val=1, imgsz=64)
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="not a dataset made here"):
        make_synth_detect(str(tmp_path / "mine"), train=1, val=1, imgsz=64, force=True)
    assert not os.path.exists(tmp_path / "x")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.unit
def test_cli_synth_detect(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth-detect", "--out", str(out), "--seed", "1", "--train", "2", "--val", "1",
                 "--imgsz", "64"]) == 0
    assert len(os.listdir(out / "images" / "train")) == 2 and len(os.listdir(out / "labels" / "val")) == 1
    assert str(out / "data.yaml") in capsys.readouterr().out
    assert main(["data", "synth-detect", "--out", str(out), "--train", "1", "--val", "1", "--imgsz", "64"]) == 2
    assert "exists" in capsys.readouterr().err
