"""Issue 35's contract: a model split across devices (a ``device_map`` over the CPU and disk
offload, loaded as ``from_pretrained(device_map=..., offload_folder=...)`` loads it) prunes to
exactly the plan and the logits it prunes to in one piece, and its offloaded blocks stay
offloaded while it is pruned (`depthprune.offload`: one block resident at a time).

Scoring and sparsifying under offload are tested in tests/test_offload.py; this is the whole
`prune_to_target`, with the selection `depthprune prune --target` takes from the recipe."""
import pytest
import torch

from depthprune.adapters.hf import random_llama, wrap
from depthprune.errors import UserError
from depthprune.importance import PruneConfig, prune_to_target

LAYERS = 4
DISK = (0, 3)  # decoder blocks offloaded to disk; the others, the embedding and the head stay on the CPU
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "disk" if i in DISK else "cpu" for i in range(LAYERS)}}
TARGET = 0.2

#: what stands between an offloaded model and `prune_to_target` today (each one checked on this model)
GAP = ("the pruning path does not handle accelerate-offloaded modules: (1) width reconciliation plans on and "
       "prunes the hooked modules' meta weights, and the hook then loads the full-size offloaded weight into the "
       "pruned module (accelerate: 'Trying to set a tensor of shape torch.Size([128, 64]) in \"weight\" (which has "
       "shape torch.Size([64, 64]))', raised from a scoring trial); (2) TaylorScorer's gradient pass loses the "
       "gradients of offloaded parameters (the hooks swap the Parameters), so their channel importance is all "
       "zero; (3) Compensator reads and writes the residual writer's meta weight (no writer is found in an "
       "offloaded block, and a refit written into one would be overwritten by the hook); (4) committed width "
       "changes and refits must become the offloaded copy (offload.store_offloaded) with the hooks put back")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Llama saved once, as a Hugging Face checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    random_llama(LAYERS).save_pretrained(folder)
    return folder


def _load(checkpoint, offload_folder=None):
    from transformers import AutoModelForCausalLM
    kw = {} if offload_folder is None else dict(device_map=DEVICE_MAP, offload_folder=str(offload_folder))
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), **kw).eval()


def _lm(model):
    return wrap(model, "random-llama", input_ids=torch.arange(16).view(1, 16) % 128)


def _on_disk(name: str) -> bool:
    """``name`` (a parameter or unit path) is inside a disk-offloaded block."""
    return name.startswith(tuple(f"model.layers.{i}." for i in DISK))


def _real_on_disk_blocks(model) -> list[str]:
    """Parameters of the disk-offloaded blocks (those still in the model) that are real tensors
    (not the meta placeholders accelerate's hooks keep between forwards)."""
    return [n for n, p in model.named_parameters() if _on_disk(n) and p.device.type != "meta"]


def _plan(pruner) -> list[dict]:
    return [{k: v for k, v in s.as_dict().items() if k != "score"} for s in pruner.steps]


@pytest.mark.unit
def test_the_offloaded_copy_is_split_as_mapped(checkpoint, tmp_path):
    """The set-up the contract below runs on: blocks 0 and 3 live on disk (meta placeholders in
    the model), the rest in CPU memory, and both copies compute the same logits."""
    one, off = _load(checkpoint), _load(checkpoint, tmp_path / "offload")
    assert off.hf_device_map == DEVICE_MAP
    disk = [n for n, _ in off.named_parameters() if _on_disk(n)]
    assert len(disk) == 18 and not _real_on_disk_blocks(off)
    assert all(p.device.type == "cpu" for n, p in off.named_parameters() if n not in disk)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(off(input_ids=x).logits, one(input_ids=x).logits, rtol=0, atol=0)


@pytest.mark.unit
@pytest.mark.xfail(strict=True, raises=UserError, reason=GAP)
def test_offloaded_model_prunes_to_the_same_plan_and_logits(checkpoint, tmp_path):
    batches = [(torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)),)]
    config = PruneConfig(target=TARGET)  # the recipe's selection (ce, compensated, Taylor channels)
    one = _load(checkpoint)
    want_pruner, want = prune_to_target(_lm(one), config, batches, progress=False)
    assert any(_on_disk(s.unit) for s in want_pruner.steps), \
        "the plan must prune inside an offloaded block for the contract to mean anything"

    off = _load(checkpoint, tmp_path / "offload")
    real_after_step: list[list[str]] = []
    got_pruner, got = prune_to_target(_lm(off), config, batches, progress=False,
                                      on_step=lambda _: real_after_step.append(_real_on_disk_blocks(off)))
    # the same plan: units, kinds, every op with its channel indices, the same scores and outcome
    assert got.config == want.config
    assert _plan(got_pruner) == _plan(want_pruner)
    assert [s.score for s in got_pruner.steps] == pytest.approx([s.score for s in want_pruner.steps], rel=1e-6)
    assert (got.params_before, got.params_after, got.reached) == (want.params_before, want.params_after, want.reached)
    # the offloaded blocks stayed offloaded: after every pruned group and at the end
    assert real_after_step and not any(real_after_step)
    assert not _real_on_disk_blocks(off)
    assert len(got.compensation) == len(want.compensation)
    # the same pruned model, its offloaded blocks served by the hooks (the pruned copies)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(off(input_ids=x).logits, one(input_ids=x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_pruning_an_offloaded_model_is_refused_in_the_users_terms_until_supported(checkpoint, tmp_path):
    off = _load(checkpoint, tmp_path / "offload")
    batches = [(torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)),)]
    with pytest.raises(UserError, match="offloads .* not supported yet"):
        prune_to_target(_lm(off), PruneConfig(target=TARGET), batches, progress=False)
    assert not _real_on_disk_blocks(off)  # refused before anything was loaded or changed
