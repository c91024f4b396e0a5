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


def _held_tensors(dg) -> list[tuple[str, tuple]]:
    """Real (not meta) tensors the autograd graph kept by a DepGraph holds: saved for backward, or
    the ``variable`` of a leaf's ``AccumulateGrad``."""
    seen, out = set(), []
    todo = [n.grad_fn for n in dg.module2node.values() if n.grad_fn is not None]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        found = [("variable", getattr(f, "variable", None))]
        for a in dir(f):
            if a.startswith("_saved_"):
                try:
                    found.append((a, getattr(f, a)))
                except (RuntimeError, TypeError):  # freed, or dropped by the trace (unpacks to nothing)
                    pass
        out += [(a, tuple(t.shape)) for a, t in found if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        todo.extend(g for g, _ in f.next_functions)
    return out


@pytest.mark.unit
def test_trace_under_offload_keeps_no_weights(tmp_path):
    """The DepGraph trace of an offloaded model holds no block's weights (only the embedding the
    graph starts at), so tracing needs one layer at a time; in memory nothing changes."""
    from depthprune.graph.build import trace_dependency_graph
    model = random_llama(3)
    ids = torch.arange(16).view(1, 16) % 128
    fwd = lambda m, x: m(input_ids=x[0]).logits  # noqa: E731
    in_memory = _held_tensors(trace_dependency_graph(model, (ids,), fwd))
    assert sum(a.startswith("_saved_") for a, _ in in_memory) > 20  # an ordinary trace saves for backward
    off = _offloaded_copy(model, tmp_path)
    held = _held_tensors(trace_dependency_graph(off, (ids,), fwd))
    assert held == [("variable", tuple(model.model.embed_tokens.weight.shape))]
    # the flags the trace lowered are back, on the Parameters the hooks put in place since
    assert all(p.requires_grad for p in off.parameters())


def _weights(model) -> dict:
    """Every tensor of ``model``, offloaded ones read back through `resident`."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        with resident(layer):
            out.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
    return out


@pytest.mark.unit
@pytest.mark.parametrize("method", ["wanda", "stade"])
def test_sparsify_under_disk_offload_equals_in_memory(tmp_path, method):
    """Sparsification calibrates through the hooks, prunes each block while it is resident and
    stores the result (and STADE's added biases) as the offloaded copy: the same model as in memory."""
    from depthprune.sparsity import sparsify
    model = random_llama(2)
    off = _offloaded_copy(model, tmp_path)
    batches = [(torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2)),)]
    lm = wrap(model, "random-llama", input_ids=torch.arange(16).view(1, 16) % 128)
    fwd = lm.forward_fn
    want = sparsify(model, method, lm.example_inputs, fwd, batches, sparsity=0.5, progress=False)
    got = sparsify(off, method, lm.example_inputs, fwd, batches, sparsity=0.5, progress=False)
    assert got["added_bias"] == want["added_bias"] and (method == "wanda") == (not want["added_bias"])
    dense = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    offloaded = _weights(off)
    assert offloaded.keys() == dense.keys()
    for k, v in dense.items():
        torch.testing.assert_close(offloaded[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert all(p.device.type == "meta" for p in off.model.layers.parameters())  # offloaded again
    with torch.no_grad():  # and the hooks serve the stored copies
        torch.testing.assert_close(fwd(off, lm.example_inputs), fwd(model, lm.example_inputs), rtol=1e-4, atol=1e-5)
