"""Recovery fine-tuning of pruned detectors with ultralytics' trainer (`depthprune finetune`)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from depthprune.adapters.load import load_model
from depthprune.adapters.yolo_train import finetune_detector
from depthprune.cli import main
from depthprune.depth import DepthPruner, count_params
from depthprune.errors import SpecError

from cli_run import snapshot

UNITS = ["model.6.m.2.cv1.conv", "model.8.cv3.conv", "model.10.conv"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from depthprune.data import make_synth_detect
    return make_synth_detect(str(tmp_path_factory.mktemp("ft") / "ds"), seed=3, train=8, val=4, imgsz=320)


@pytest.mark.integration
def test_finetune_trains_a_pruned_copy_without_pickles(tiny_set, tmp_path):
    lm = load_model("yolov5n-synth")
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    for u in UNITS:
        pruner.prune(u)
    n = count_params(lm.model)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out, info = finetune_detector(lm.model, tiny_set, 320, 1, str(tmp_path / "work"), batch=4, workers=0,
                                  val=False, lr0=1e-3, optimizer="AdamW", warmup_epochs=0)
    # the input is untouched; the copy has the pruned structure, trained weights, eval mode, frozen
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert count_params(out) == n and out is not lm.model and not out.training
    assert not any(p.requires_grad for p in out.parameters())
    assert set(out.state_dict()) == set(before)
    changed = [k for k, v in out.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("conv.weight") for k in changed)
    for u in UNITS:  # stand-ins stay stand-ins
        assert type(out.get_submodule(u)) is type(lm.model.get_submodule(u))
    assert info["epochs"] == 1 and info["seconds"] > 0
    x = lm.example_inputs[0]
    with torch.no_grad():
        assert lm.forward_fn(out, (x,)).shape == lm.forward_fn(lm.model, (x,)).shape
    written = [f for _, _, fs in os.walk(tmp_path / "work") for f in fs]
    assert not [f for f in written if f.endswith(".pt")], written  # nothing pickled


def test_finetune_refuses_zero_epochs_and_missing_data(tmp_path):
    net = torch.nn.Conv2d(3, 3, 1)  # checked before the model is looked at
    with pytest.raises(SpecError, match="at least 1 epoch"):
        finetune_detector(net, str(tmp_path / "x.yaml"), 64, 0, str(tmp_path))
    with pytest.raises(SpecError, match="no such dataset"):
        finetune_detector(net, str(tmp_path / "x.yaml"), 64, 1, str(tmp_path))


@pytest.mark.integration
def test_cli_finetune_pruned_directory(tiny_set, tmp_path, capsys):
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    assert main(["prune", "--model", "yolov5n-synth", "--units", ",".join(UNITS), "--out", str(pruned), "-q"]) == 0
    digest = snapshot(pruned)
    capsys.readouterr()
    assert main(["finetune", "--model", str(pruned), "--data", tiny_set, "--epochs", "1", "--batch", "4",
                 "--workers", "0", "--out", str(tuned), "-q", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert snapshot(pruned) == digest  # the input directory is not touched
    assert report["epochs"] == 1 and report["map_after"]["mAP50-95"] >= 0 and report["map_before"]["mAP50-95"] >= 0
    saved = json.loads((tuned / "report.json").read_text())
    assert saved["command"] == "finetune" and saved["finetune"]["epochs"] == 1
    assert saved["prune"]["units"][0]["unit"] == UNITS[0]  # the prune section is carried over
    # the structure drawing is carried over (training changes no structure) and the page is written
    assert (tuned / "graph.json").read_text() == (pruned / "graph.json").read_text()
    assert "mAP50-95 after fine-tuning" in (tuned / "report.html").read_text()
    from depthprune.io.model_dir import load_pruned
    lm, _ = load_pruned(tuned)
    assert count_params(lm.model) == report["params"]
    p0 = load_pruned(pruned)[0].model
    assert not torch.equal(lm.model.model[0].conv.weight, p0.model[0].conv.weight)


def test_cli_finetune_bad_input(tmp_path, capsys):
    ds = tmp_path / "data.yaml"
    ds.write_text("train: a\nval: b\nnames: [x]\n")
    assert main(["finetune", "--model", "yolov5n-synth", "--data", str(tmp_path / "none.yaml"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such dataset YAML" in capsys.readouterr().err
    assert main(["finetune", "--model", "smollm2-135m", "--data", str(ds), "--out", str(tmp_path / "o")]) == 2
    assert "not a detector" in capsys.readouterr().err
    assert main(["finetune", "--model", "yolov5n-synth", "--data", str(ds), "--epochs", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
