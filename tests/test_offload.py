"""Scoring under accelerate's disk offload: one block resident at a time, the same scores."""
import pytest
import torch

from depthprune.adapters.hf import random_llama, wrap
from depthprune.depth.engine import DepthPruner
from depthprune.importance import AngularScorer, make_groups
from depthprune.offload import offloaded_modules, resident


def _offloaded_copy(model, folder):
    from accelerate import disk_offload, init_empty_weights
    from accelerate.utils import offload_state_dict
    offload_state_dict(str(folder), model.state_dict())
    with init_empty_weights(include_buffers=False):
        empty = type(model)(model.config).eval()
    return disk_offload(empty, str(folder), execution_device=torch.device("cpu"))


def _scores(model, batches, per_block=None):
    lm = wrap(model, "random-llama", input_ids=torch.arange(16).view(1, 16) % 128)
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    scorer = AngularScorer(lm.model, batches, lm.forward_fn, progress=False)
    groups = make_groups(pruner, "fine")
    out = {}
    for b, (_, block) in enumerate(scorer.blocks):
        with per_block(block) if per_block else torch.no_grad():
            out.update(scorer.score(pruner, [g for g in groups if g.block == b]))
    return out, groups


@pytest.mark.unit
def test_resident_scoring_under_disk_offload_equals_in_memory(tmp_path):
    model = random_llama(3)
    batches = [(torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)),)]
    want, _ = _scores(model, batches)
    off = _offloaded_copy(model, tmp_path)
    assert all(p.device.type == "meta" for p in off.model.layers.parameters())
    got, groups = _scores(off, batches, resident)
    assert len(got) == 12 and got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert all(s != float("inf") for s in got.values())
    # after scoring every block is offloaded again, with its full-size weights
    assert all(p.device.type == "meta" for p in off.model.layers.parameters())
    assert len(offloaded_modules(off.model.layers[0])) == 9  # 7 Linear + 2 RMSNorm
    with resident(off.model.layers[1]) as blk:
        w = blk.mlp.up_proj.weight
        assert w.device.type == "cpu" and torch.equal(w, model.model.layers[1].mlp.up_proj.weight)
        assert off.model.layers[0].mlp.up_proj.weight.device.type == "meta"


@pytest.mark.unit
def test_without_resident_mlp_trials_cannot_run_under_offload(tmp_path):
    """The gap `resident` closes: a trial width-prunes the (meta) weight, and the hook then loads
    the full-size offloaded weight into it."""
    off = _offloaded_copy(random_llama(2), tmp_path)
    batches = [(torch.randint(0, 128, (1, 16)),)]
    with pytest.raises(ValueError, match="Trying to set a tensor of shape"):
        _scores(off, batches)
