"""Issue 13's contracts over the architecture zoo (`tests/archs.py`, `tests/battery.py`): the
decoders and encoders here, the CNNs and detectors in test_architectures_cnn.py (two files, so two
test processes share the work).

Every listed candidate prunes alone with promise == drop and a model that runs with its output
shapes; random prune sequences hold the same at every step; for HF decoders, pruning every unit
of a block equals deleting it and the attention unit alone equals skipping the attention
sublayer (max |delta logit| <= 1e-5, fp32); the CLI ``python:`` route works on an HF model built
with its default config.
"""
import json
import os
from pathlib import Path

import pytest

from archs import DECODERS, ENCODERS
from battery import (EXACT, attention_equivalence, block_equivalence, every_candidate_alone, zoo,
                     zoo_random_sequences, zoo_session as session)
from cli_run import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo([*DECODERS, *ENCODERS]))
def test_every_candidate_alone(name):
    every_candidate_alone(name)


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo([*DECODERS, *ENCODERS]))
def test_random_sequences(name):
    zoo_random_sequences(name)


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo(DECODERS))
def test_block_equals_deletion(name):
    arch, base, _, report = session(name)
    report.equivalence_errors = []
    block_equivalence(arch, base, report)
    assert report.equivalence_errors == []
    assert report.block_diff <= EXACT


@pytest.mark.integration
@pytest.mark.parametrize("name", zoo(DECODERS))
def test_attention_equals_sublayer_skip(name):
    arch, base, _, report = session(name)
    report.equivalence_errors = []
    attention_equivalence(arch, base, report)
    assert report.equivalence_errors == []
    assert report.attention_diff <= EXACT


def _cli(*args, env):
    return run_cli(list(args), env=env, cwd=ROOT)


@pytest.mark.integration
def test_cli_python_route_on_hf_default_config(tmp_path):
    """`python:MODULE:CALLABLE` returning an HF model with its default config (use_cache on)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    spec = "python:archs:qwen2_default"
    r = _cli("graph", "--model", spec, "--json", env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["attention"] == 2 and summary["transforms"] == 2 * 3 + 1
    r = _cli("candidates", "--model", spec, "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed["summary"]["candidates"] == 8
    units = [u for u in listed["units"] if u["candidate"]]
    pick = [units[0]["unit"], next(u["unit"] for u in units if u["kind"] == "attention")]
    out = tmp_path / "pruned"
    r = _cli("prune", "--model", spec, "--units", ",".join(pick), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in rep["units"]] == pick
    assert rep["params_before"] - rep["params_after"] == sum(u["params_removed"] for u in rep["units"])


@pytest.mark.integration
def test_hf_dir_without_tokenizer_falls_back_to_random_ids(tmp_path):
    from archs import qwen2_default

    from depthprune.adapters.load import load_model
    from depthprune.depth import DepthPruner
    model, _ = qwen2_default()
    model.save_pretrained(tmp_path / "m")  # weights and config, no tokenizer files
    with pytest.warns(UserWarning, match="random token ids"):
        lm = load_model(str(tmp_path / "m"))
    assert lm.tokenizer is None
    ids = lm.example_inputs[0]
    assert ids.shape == (1, 16) and int(ids.max()) < model.config.vocab_size
    dp = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn)
    assert sum(c.candidate for c in dp.candidates()) == 8


@pytest.mark.integration
def test_a_decoder_dir_whose_tokenizer_fails_to_load_prunes_and_evaluates_within_its_context(tmp_path):
    """Weights and config only, for an architecture whose AutoTokenizer raises without tokenizer
    files, and a context of 64 tokens: it loads with a warning, prunes with the defaults,
    evaluates perplexity over windows of its own context, and ``--speed`` (prompts of 256
    tokens) is refused with exit 2 before any work."""
    DECODERS["llama"]().model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    r = run_cli(["prune", "-q", "--model", str(tmp_path / "m"), "--target", "0.3", "--calib-samples", "8",
                 "--seq-len", "16", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert "no usable tokenizer" in r.stderr and "random token ids" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["compensate"] and report["reduction"] >= 0.3
    r = run_cli(["eval", str(out), "--json"])
    assert r.returncode == 0, r.stderr
    ppl = json.loads(r.stdout)["perplexity"]
    assert ppl["window"] == 64 and ppl["dense"] > 0 and ppl["value"] > 0
    r = run_cli(["eval", str(out), "--speed"])
    assert r.returncode == 2 and "context is 64 tokens" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.unit
def test_python_route_hf_encoder_traces_its_first_output():
    import torch

    from depthprune.adapters.hf import wrap_user_model
    from depthprune.graph import CompGraph
    from conftest import tiny_bert
    model, inputs = tiny_bert(2)
    lm = wrap_user_model(model, inputs, "python:bert")
    with torch.no_grad():
        assert torch.equal(lm.forward_fn(lm.model, lm.example_inputs), model(**inputs).last_hidden_state)
    assert CompGraph(lm.model, lm.example_inputs, lm.forward_fn).summary()["attention"] == 2


@pytest.mark.unit
def test_repeat_identity_round_trips_through_its_spec():
    import torch

    from depthprune.depth.identity import Identity, make_stand_in
    x = torch.randn(2, 3, 4)
    fused = Identity(repeat=3, dim=-1)
    assert torch.equal(fused(x), torch.cat([x, x, x], dim=-1))
    again = make_stand_in(fused.spec())
    assert isinstance(again, Identity) and torch.equal(again(x), fused(x))
    assert Identity().spec() == make_stand_in(Identity().spec()).spec() and "repeat" not in Identity().spec()


class _EmbedThenNarrow(__import__("torch").nn.Module):
    """Token embedding (width 8) -> a linear 8 -> 4 -> head: making the linear square would
    narrow the embedding."""

    def __init__(self):
        import torch.nn as nn
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(10, 8), nn.Linear(8, 4), nn.Linear(4, 10)

    def forward(self, ids):
        return self.head(self.lin(self.emb(ids)))


@pytest.mark.unit
def test_reconciliation_never_narrows_the_embedding():
    import torch

    from depthprune.depth import DepthPruner
    from depthprune.errors import UserError
    torch.manual_seed(0)
    dp = DepthPruner(_EmbedThenNarrow().eval(), (torch.randint(0, 10, (1, 5)),))
    lin = next(c for c in dp.candidates() if c.unit == "lin")
    assert not lin.candidate and "embedding width" in lin.reason
    with pytest.raises(UserError, match="embedding width"):
        dp.prune("lin")
    assert dp.model.emb.embedding_dim == 8 and dp.model.lin.in_features == 8


@pytest.mark.integration
def test_cli_python_route_prunes_a_plain_model_to_a_target(tmp_path):
    """A plain model from `python:MODULE:CALLABLE` has no forward function of its adapter:
    scoring its blocks called None (a traceback) where the model itself should be called."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = tmp_path / "pruned"
    r = _cli("prune", "--model", "python:archs:plain_blocks", "--target", "0.2", "--out", str(out), "-q", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["units"] and rep["params_before"] - rep["params_after"] == sum(u["params_removed"] for u in rep["units"])
    assert rep["params_after"] <= 0.8 * rep["params_before"]


@pytest.mark.integration
def test_cli_target_on_a_model_without_repeated_blocks_scores_its_outputs(tmp_path):
    """Without an ``nn.ModuleList`` of blocks (timm's and torchvision's models keep theirs in an
    ``nn.Sequential``) the default angular score had nothing to compare and `prune --target`
    stopped; it now falls back to the change of the model's outputs (`--score output`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = tmp_path / "pruned"
    r = _cli("prune", "--model", "python:archs:plain_sequential", "--target", "0.2", "--out", str(out), "-q", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["score"] == "output" and rep["params_after"] <= 0.8 * rep["params_before"]
    r = _cli("prune", "--model", "python:archs:plain_sequential", "--target", "0.2", "--score", "angular",
             "--out", str(tmp_path / "no"), env=env)
    assert r.returncode == 2 and "--score output" in r.stderr and not (tmp_path / "no").exists()


@pytest.mark.unit
def test_output_score_is_the_relative_change_of_the_outputs():
    """`OutputScorer` on one trial equals ``sum ||y - y_dense||^2 / sum ||y_dense||^2`` computed
    by hand on a copy pruned the same way."""
    import copy

    import torch
    from archs import plain_sequential

    from depthprune.depth import DepthPruner
    from depthprune.importance.groups import make_groups
    from depthprune.importance.scores import OutputScorer
    model, inputs = plain_sequential()
    dense = model(*inputs).detach()
    dp = DepthPruner(model, inputs)
    groups = [g for g in make_groups(dp, "fine") if g.name == "blocks.1.fc1"]
    twin = copy.deepcopy(model)
    scores = OutputScorer(model, [inputs], None, progress=False).score(dp, groups)
    DepthPruner(twin, inputs).prune("blocks.1.fc1")
    y = twin(*inputs).detach()
    expected = float((y.double() - dense.double()).pow(2).sum() / dense.double().pow(2).sum())
    assert scores["blocks.1.fc1"] == pytest.approx(expected, rel=1e-9) and expected > 0
    assert torch.equal(model(*inputs), dense)  # the trial was undone
