"""Every task head ultralytics ships (detect, segment, pose, OBB, classify), one model of each
(built from its YAML, random weights, 64 x 64 images) under the battery of `tests/battery.py`:
units are listed, every listed candidate prunes alone with promise == drop and a model that runs
with its output shapes, random sequences hold the same at every step, the listing's trials leave
the model exactly as it was, and every refusal gives its reason in the user's terms (never the
text of an internal exception).

The pose head decodes its keypoints by assigning slices of a tensor in place
(``y[:, 2::3] = y[:, 2::3].sigmoid()``) before its final concatenation; that once made every
unit of a pose model fail with ``KeyError: 'operands'``.
"""
import copy
import re

import pytest
import torch

from archs import IMAGE, Arch
from battery import Report, list_candidates, random_sequences, single_prunes

#: one model per task head, on the family the zoo already checks for detection (yolov8)
TASKS = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml",
         "obb": "yolov8n-obb.yaml", "classify": "yolov8n-cls.yaml"}

#: an exception's name or an internal error's wording in a refusal reason
_INTERNAL = re.compile(r"\b\w*(Error|Exception)\b|cannot be pruned consistently|Traceback")


def _arch(cfg: str) -> Arch:
    from depthprune.adapters.yolo import load_yolo
    lm = load_yolo(cfg, imgsz=IMAGE)
    return Arch(cfg.split(".")[0], "yolo", lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe)


def _outputs(arch: Arch, model) -> list[torch.Tensor]:
    with torch.no_grad():
        out = arch.forward_fn(model, arch.example_inputs)
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_task_head_battery(task):
    arch = _arch(TASKS[task])
    dense = _outputs(arch, arch.model)
    report = Report(arch.name, arch.kind)
    base, cands = list_candidates(arch, report)
    assert base is not None, report.graph_error
    assert cands, "no candidates listed"
    listed = base.candidates()
    internal = [f"{c.unit}: {c.reason}" for c in listed if not c.candidate and _INTERNAL.search(c.reason or "")]
    assert internal == []
    after = _outputs(arch, base.model)  # every promise was a trial rolled back: nothing changed
    assert len(after) == len(dense) and all(torch.equal(a, b) for a, b in zip(after, dense))
    single_prunes(arch, base, cands, report)
    assert report.single_failures == []
    random_sequences(arch, base, report, seeds=(0,), steps=8)
    assert report.sequence_failures == []
    assert report.sequence_steps > 0


@pytest.mark.integration
@pytest.mark.slow
def test_pose_keypoint_branch_conv_prunes_exactly():
    """A square conv of the keypoint branch pruned equals its Conv block (conv, BatchNorm, SiLU)
    replaced by the identity, outputs compared exactly (fp32, up to float rounding); its
    branch's last conv, which writes the keypoints, is refused as a fixed-width model output."""
    from depthprune.depth import DepthPruner
    arch = _arch(TASKS["pose"])
    head = f"model.{len(arch.model.model) - 1}"
    reference = copy.deepcopy(arch.model)
    reference.model[-1].cv4[0][1] = torch.nn.Identity()
    dp = DepthPruner(arch.model, arch.example_inputs, arch.forward_fn, recipe=arch.recipe)
    assert "fixed-width model output" in (dp.why_not(f"{head}.cv4.0.2") or "")
    dp.prune(f"{head}.cv4.0.1.conv")
    got, want = _outputs(arch, dp.model), _outputs(arch, reference)
    assert [t.shape for t in got] == [t.shape for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
