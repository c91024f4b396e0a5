"""Trained detectors: the packaged `yolov5n-synth`, checkpoints as ultralytics' trainer writes them
(fp16, requires_grad=False, training size), Taylor on them, fuse() and the validator after pruning."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from depthprune.adapters.load import load_model
from depthprune.cli import main
from depthprune.depth import DepthPruner
from depthprune.importance import TaylorScorer

NAMES = ["circle", "square", "triangle", "cross"]
#: channel-preserving (bottleneck cv1, C3 cv3) and channel-changing (C3 cv1) units of yolov5n
UNITS = ["model.2.m.0.cv1.conv", "model.4.cv3.conv", "model.6.cv1.conv"]
#: the packaged detector on 32 held-out synthetic images (seed 1) measured mAP50 0.658 / mAP50-95
#: 0.505 dense, and mAP50 0.581 with PACKAGED_UNITS pruned (6.7 % fewer parameters, no fine-tuning)
PACKAGED_MAP50_AT_LEAST, PACKAGED_MAP50_95_AT_LEAST = 0.55, 0.40
PRUNED_MAP50_AT_LEAST = 0.45
#: channel-preserving (C3 bottleneck cv1, C3 cv3) and channel-changing (256 -> 128) units
PACKAGED_UNITS = ["model.6.m.2.cv1.conv", "model.8.cv3.conv", "model.10.conv"]


def _random_detector(seed: int = 0):
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(seed)
    m = DetectionModel("yolov5n.yaml", nc=len(NAMES), verbose=False)
    m.names = dict(enumerate(NAMES))
    return m.eval()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint in the form ultralytics' trainer leaves it (`strip_optimizer`: fp16 EMA model,
    every requires_grad False, training arguments with imgsz 320). Random weights: the bugs are
    about the form, not the values."""
    from ultralytics.utils.torch_utils import strip_optimizer
    d = tmp_path_factory.mktemp("ckpt")
    f = d / "det.pt"
    torch.save({"model": _random_detector(), "train_args": {"imgsz": 320, "task": "detect", "box": 7.5, "cls": 0.5,
                                                             "dfl": 1.5}}, f)
    strip_optimizer(f)
    ckpt = torch.load(f, weights_only=False)
    assert ckpt["model"].model[0].conv.weight.dtype == torch.float16
    assert not any(p.requires_grad for p in ckpt["model"].parameters())
    return f


@pytest.mark.integration
def test_checkpoint_loads_at_training_size_with_every_candidate(trained_checkpoint):
    lm = load_model(str(trained_checkpoint), trust_checkpoint=True)
    assert lm.example_inputs[0].shape == (1, 3, 320, 320)
    assert next(lm.model.parameters()).dtype == torch.float32
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)
    cands = pruner.candidates()
    assert not [c for c in cands if c.reason == "frozen parameters"]
    assert sum(c.candidate for c in cands) == 50  # as on a model built from its YAML
    dfl = lm.model.model[-1].dfl.conv.weight
    assert not dfl.requires_grad  # the fixed DFL projection stays fixed
    assert all(p.requires_grad for n, p in lm.model.named_parameters() if ".dfl." not in n)
    # an explicit size still wins; a model YAML has no training size
    assert load_model("yolov5n.yaml").example_inputs[0].shape[-1] == 640


@pytest.mark.integration
def test_taylor_on_trained_checkpoint(trained_checkpoint):
    """Loaded through the adapter, and as the raw checkpoint module (fp16, frozen): both score."""
    from depthprune.adapters.yolo import output_energy_loss
    lm = load_model(str(trained_checkpoint), trust_checkpoint=True)
    batches = [lm.example_inputs]
    t = TaylorScorer(lm.model, batches, output_energy_loss, progress=False)
    first = id(lm.model.model[0].conv)
    assert t.imp[first]["weight"].sum() > 0 and t.present() > 0
    assert all(p.grad is None for p in lm.model.parameters())

    raw = torch.load(trained_checkpoint, weights_only=False)["model"].eval()
    flags = [p.requires_grad for p in raw.parameters()]
    t16 = TaylorScorer(raw, batches, output_energy_loss, progress=False)
    # the model is left as it was: fp16, same flags, no gradients
    assert raw.model[0].conv.weight.dtype == torch.float16
    assert [p.requires_grad for p in raw.parameters()] == flags and all(p.grad is None for p in raw.parameters())
    # and the scores are those of its float32 copy
    ref = TaylorScorer(copy.deepcopy(raw).float(), batches, output_energy_loss, progress=False)
    assert not any(p.requires_grad for p in ref.model.parameters())  # float32 and frozen: scored in place
    for m in (raw.model[0].conv, raw.model[2].cv1.conv, raw.model[9].cv2.conv):
        assert torch.equal(t16.imp[id(m)]["weight"], ref.imp[id(_twin(ref.model, raw, m))]["weight"])
    assert t16.present() == pytest.approx(ref.present(), rel=1e-12)


def _twin(copy_model, model, module):
    """The module of ``copy_model`` at the path ``module`` has in ``model``."""
    path = {id(m): n for n, m in model.named_modules()}[id(module)]
    return copy_model.get_submodule(path)


def _prune(lm, units, recipe=None):
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=recipe or lm.recipe)
    for u in units:
        pruner.prune(u)
    return pruner


@pytest.mark.integration
@pytest.mark.parametrize("recipe", [None, {"post_norm": "keep", "exclude_classes": ["Detect"]},
                                    {"fold_batchnorm": True, "exclude_classes": ["Detect"]}],
                         ids=["bn-in-unit", "bn-kept", "bn-folded"])
def test_pruned_detector_fuses_exactly(trained_checkpoint, recipe):
    """ultralytics' fuse() on a pruned model: every Conv block ends without a BatchNorm, the
    outputs do not change beyond float rounding, and stand-ins remain where units were pruned."""
    from ultralytics.nn.modules.conv import Conv
    from depthprune.depth.identity import PrunedModule
    lm = load_model(str(trained_checkpoint), trust_checkpoint=True)
    with torch.no_grad():  # trained-like BatchNorm statistics, so that folding them is not a no-op
        g = torch.Generator().manual_seed(0)
        for m in lm.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    _prune(lm, UNITS, recipe)
    x = lm.example_inputs[0]
    with torch.no_grad():
        before = lm.forward_fn(lm.model, (x,))
    kept = isinstance(lm.model.model[2].m[0].cv1.bn, torch.nn.BatchNorm2d)
    assert kept == (recipe is not None and recipe.get("post_norm") == "keep")
    fused = lm.model.fuse(verbose=False)
    assert fused is lm.model and fused.is_fused()
    assert not any(isinstance(m, Conv) and hasattr(m, "bn") for m in fused.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert isinstance(fused.model[2].m[0].cv1.conv, torch.nn.Conv2d if kept else PrunedModule)
    with torch.no_grad():
        after = lm.forward_fn(fused, (x,))
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-3)


@pytest.mark.unit
@pytest.mark.parametrize("conv_state", ["live", "identity", "zero"])
@pytest.mark.parametrize("bn_state", ["live", "identity"])
def test_fuse_stand_ins_every_combination(conv_state, bn_state):
    """One ultralytics Conv block with trained-like BatchNorm statistics: whatever was pruned in
    it, fuse_stand_ins leaves act(conv(x)) without bn and the same outputs."""
    from ultralytics.nn.modules.conv import Conv
    from depthprune.adapters.yolo import fuse_stand_ins
    from depthprune.depth.identity import Identity, Zero
    torch.manual_seed(0)
    m = Conv(8, 8, 3).eval()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.5)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_(0, 0.5)
    stand_in = {"identity": Identity, "zero": Zero}
    if conv_state != "live":
        m.conv = stand_in[conv_state]()
    if bn_state != "live":
        m.bn = stand_in[bn_state]()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        before = m(x)
        fuse_stand_ins(m)
        after = m(x)
    expect_untouched = conv_state == "live" and bn_state == "live"
    assert hasattr(m, "bn") == expect_untouched
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    if not expect_untouched:
        assert not any(isinstance(c, torch.nn.BatchNorm2d) for c in m.modules())


@pytest.mark.integration
def test_pruned_detector_copies_and_pickles(trained_checkpoint, tmp_path):
    """The stand-in-aware fuse travels with deep copies and pickles (ultralytics copies models)."""
    lm = load_model(str(trained_checkpoint), trust_checkpoint=True)
    _prune(lm, UNITS[:1])
    dup = copy.deepcopy(lm.model)
    assert dup.fuse.model is dup and dup.fuse(verbose=False).is_fused()
    torch.save(lm.model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert back.fuse(verbose=False).is_fused()


@pytest.mark.integration
def test_plan_records_the_spec_as_given(trained_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "w").mkdir()
    os.link(trained_checkpoint, tmp_path / "w" / "det.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--model", "w/det.pt", "--trust-checkpoint", "--units", UNITS[0], "--out", "p"]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert plan["base"] == "w/det.pt" and report["model"] == "w/det.pt"
    for name in ("plan.json", "report.json"):
        assert str(tmp_path) not in (tmp_path / "p" / name).read_text()
    from depthprune.io.model_dir import load_pruned
    lm, _ = load_pruned("p")  # self-contained: the (pickled) base is not read again, so no trust is needed
    assert lm.example_inputs[0].shape[-1] == 320


@pytest.mark.integration
def test_detector_directory_roundtrip(tmp_path):
    """save_detector/load_detector: YAML + fp16 safetensors + JSON, no pickle; the loaded model is
    the fp16-rounded original, at the stored size, under the directory spec."""
    from depthprune.adapters.yolo_weights import is_detector_dir, load_detector, save_detector
    from depthprune.errors import SpecError
    m = _random_detector(1)
    save_detector(m, str(tmp_path / "d"), {"imgsz": 256, "names": NAMES, "train_args": {"box": 7.0}})
    assert sorted(os.listdir(tmp_path / "d")) == ["meta.json", "model.safetensors", "model.yaml"]
    assert is_detector_dir(tmp_path / "d") and not is_detector_dir(tmp_path)
    loaded, meta = load_detector(tmp_path / "d")
    assert meta["imgsz"] == 256 and loaded.names == dict(enumerate(NAMES)) and loaded.args == {"box": 7.0}
    ref = copy.deepcopy(m).half().float()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], ref(x)[0])
    lm = load_model(str(tmp_path / "d"))
    assert lm.family == "yolo" and lm.example_inputs[0].shape == (1, 3, 256, 256) and lm.spec == str(tmp_path / "d")
    (tmp_path / "d" / "model.yaml").write_text((tmp_path / "d" / "model.yaml").read_text().replace("nc: 4", "nc: 5"))
    with pytest.raises(SpecError, match="do not fit"):
        load_detector(tmp_path / "d")
    os.remove(tmp_path / "d" / "meta.json")
    with pytest.raises(SpecError, match="missing meta.json"):
        load_detector(tmp_path / "d")


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory):
    """32 held-out images (seed 1; the detector was trained and validated on seed 0)."""
    from depthprune.data import make_synth_detect
    return make_synth_detect(str(tmp_path_factory.mktemp("synth") / "ds"), seed=1, train=1, val=32, imgsz=320)


@pytest.mark.integration
def test_packaged_detector_files():
    from safetensors import safe_open
    from depthprune.adapters.yolo_weights import PACKAGED_DETECTORS
    d = PACKAGED_DETECTORS["yolov5n-synth"]
    assert sorted(os.listdir(d)) == ["meta.json", "model.safetensors", "model.yaml"]
    assert os.path.getsize(d / "model.safetensors") < 6_000_000
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16, torch.int64}  # int64: BatchNorm batch counters
    meta = json.loads((d / "meta.json").read_text())
    assert meta["imgsz"] == 320 and meta["names"] == NAMES and "bench/train_detector.py" in meta["train_command"]


@pytest.mark.integration
def test_packaged_detector_validates(synth_val):
    from depthprune.eval.detect import validate_detector
    lm = load_model("yolov5n-synth")
    assert lm.spec == "yolov5n-synth" and lm.example_inputs[0].shape == (1, 3, 320, 320)
    m = validate_detector(lm.model, synth_val, 320)
    assert m["mAP50"] > PACKAGED_MAP50_AT_LEAST and m["mAP50-95"] > PACKAGED_MAP50_95_AT_LEAST
    # the validator fused and froze a copy, not the model
    assert not lm.model.is_fused() and lm.model.model[0].conv.weight.requires_grad


@pytest.mark.integration
def test_pruned_packaged_detector_fuses_and_validates(synth_val):
    from depthprune.eval.detect import validate_detector
    lm = load_model("yolov5n-synth")
    pruner = _prune(lm, PACKAGED_UNITS)
    assert [s.unit for s in pruner.steps] == PACKAGED_UNITS
    m = validate_detector(lm.model, synth_val, 320)
    assert m["mAP50"] > PRUNED_MAP50_AT_LEAST
    x = lm.example_inputs[0]
    with torch.no_grad():
        before = lm.forward_fn(lm.model, (x,))
        after = lm.forward_fn(lm.model.fuse(verbose=False), (x,))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-3)
