"""Trained detectors: the packaged `yolov5n-synth`, checkpoints as ultralytics' trainer writes them
(fp16, requires_grad=False, training size), Taylor on them, fuse() and the validator after pruning."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from depthprune.adapters import load_model
from depthprune.cli import main
from depthprune.depth import DepthPruner
from depthprune.importance import TaylorScorer

NAMES = ["circle", "square", "triangle", "cross"]
#: channel-preserving (bottleneck cv1, C3 cv3) and channel-changing (C3 cv1) units of yolov5n
UNITS = ["model.2.m.0.cv1.conv", "model.4.cv3.conv", "model.6.cv1.conv"]


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
    assert sum(c.candidate for c in cands) == 50  # as on a model built from its YAML (DESIGN.md)
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
    from depthprune.depth.plan import load_pruned
    lm, _ = load_pruned("p", trust_checkpoint=True)  # the relative base resolves from where it was given
    assert lm.example_inputs[0].shape[-1] == 320
