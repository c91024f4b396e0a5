"""`prune --budget latency`: the per-module latency table (`depthprune profile`), its estimate of
a pruned structure against hand counts, its JSON round trip, and the cache that a changed model
invalidates."""
import json

import pytest
import torch
import torch.nn as nn

from cli_run import assert_one_line_error, cli_env, run_cli
from depthprune.adapters.hf import random_llama, wrap
from depthprune.depth import DepthPruner
from depthprune.errors import UserError
from depthprune.importance import LatencyTable, profile_latency


def _gone(table: LatencyTable, model: nn.Module) -> float:
    """The table's time of the modules no longer in ``model`` as measured (replaced or removed)."""
    now = dict(model.named_modules())
    return sum(e["s"] for n, e in table.modules.items() if n not in now or type(now[n]).__name__ != e["type"])


def _table(modules: dict, fp: str = "f") -> LatencyTable:
    return LatencyTable(fingerprint=fp, device="cpu", dtype="float32", threads=1, shape=[[1, 4]], rounds=1,
                        total_s=sum(e["s"] for e in modules.values()), spread=0.0, modules=modules)


@pytest.mark.unit
def test_estimate_counts_the_modules_left_scaled_by_their_parameters_left():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    t = _table({"": {"type": "Sequential", "params": 0, "s": 1.0},
                "0": {"type": "Linear", "params": 40, "s": 2.0},
                "1": {"type": "ReLU", "params": 0, "s": 0.5},
                "2": {"type": "Linear", "params": 36, "s": 3.0}})
    assert t.estimate(model) == 6.5
    # the activation replaced by a stand-in, the first layer narrowed to 4 outputs (20 of 40
    # parameters left), the second to 4 inputs (20 of 36)
    model[1] = nn.Identity()
    model[0], model[2] = nn.Linear(4, 4), nn.Linear(4, 4)
    assert t.estimate(model) == pytest.approx(1.0 + 2.0 * 20 / 40 + 3.0 * 20 / 36)
    # a module gone with its parent costs nothing
    assert t.estimate(nn.Sequential(nn.Identity())) == 1.0


@pytest.mark.unit
def test_profiled_table_adds_up_to_the_forward_and_a_pruned_attention_drops_its_modules():
    lm = wrap(random_llama(2), "random-llama:2")
    x = (torch.randint(0, 128, (1, 32)),)
    t = profile_latency(lm.model, lm.forward_fn, x, rounds=3, warmup=1, progress=False)
    assert set(t.modules) == {n for n, _ in lm.model.named_modules()} - {"model.layers"}  # a ModuleList never runs
    assert all(e["s"] >= 0 for e in t.modules.values())
    assert t.estimate(lm.model) == pytest.approx(t.total_s, rel=1e-9)
    assert t.shape == [[1, 32]] and t.rounds == 3 and t.device == "cpu" and t.dtype == "float32"
    assert t.modules["model.layers.0.mlp.up_proj"]["params"] == 64 * 128
    DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change) \
        .prune("model.layers.0.self_attn")
    gone = [n for n in t.modules if n.startswith("model.layers.0.self_attn")] + ["model.layers.0.input_layernorm"]
    assert len(gone) == 6
    assert t.estimate(lm.model) == pytest.approx(t.total_s - sum(t.modules[n]["s"] for n in gone), rel=1e-9)


@pytest.mark.unit
def test_table_round_trips_and_refuses_damage_and_other_models():
    lm = wrap(random_llama(2), "random-llama:2")
    t = profile_latency(lm.model, lm.forward_fn, (torch.randint(0, 128, (1, 8)),), rounds=1, warmup=0, progress=False)
    back = LatencyTable.from_json(json.loads(json.dumps(t.to_json())))
    assert back == t
    back.check(lm.model)
    with pytest.raises(UserError, match="measured on another model"):
        back.check(random_llama(3))
    with pytest.raises(UserError, match="not a depthprune latency table"):
        LatencyTable.from_json({"format": "x"})
    bad = t.to_json()
    bad["modules"]["model"]["s"] = -1.0
    with pytest.raises(UserError, match="damaged"):
        LatencyTable.from_json(bad)
    del bad["total_s"]
    with pytest.raises(UserError, match="damaged"):
        LatencyTable.from_json(bad)


@pytest.mark.integration
def test_cli_profile_table_is_cached_used_by_prune_and_invalidated_by_another_model(tmp_path):
    env = cli_env(DEPTHPRUNE_CACHE=str(tmp_path / "cache"))
    table = tmp_path / "t.json"
    r = run_cli(["profile", "--model", "random-llama:2", "--seq-len", "16", "--rounds", "2", "--out", str(table),
                 "--device", "cpu"], env=env)
    assert r.returncode == 0, r.stderr
    assert "ms per forward" in r.stdout and "model.layers.0.self_attn" in r.stdout
    written = json.loads(table.read_text())
    cached = list((tmp_path / "cache" / "latency").iterdir())
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == written
    # prune with the same window size finds the cached table (no second measurement)
    out = tmp_path / "p"
    r = run_cli(["prune", "--model", "random-llama:2", "--target", "0.3", "--budget", "latency", "--calib-samples", "2",
                 "--seq-len", "16", "--out", str(out), "--device", "cpu"], env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["budget"] == "latency" and rep["latency_table"]["total_s"] == written["total_s"]
    lat = rep["costs"]["latency"]
    assert lat["before"] == pytest.approx(written["total_s"])
    assert rep["budget_reduction"] == pytest.approx((lat["before"] - lat["after"]) / lat["before"])
    assert rep["budget_reduction"] >= 0.3 and "latency" in r.stdout
    assert f"{1000 * lat['before']:,.2f} → {1000 * lat['after']:,.2f}" in (out / "report.html").read_text()
    assert len(list((tmp_path / "cache" / "latency").iterdir())) == 1
    # the pruned output profiles too (what it spends where): its own architecture, its own entry
    r = run_cli(["profile", "--model", str(out), "--seq-len", "16", "--rounds", "1", "--json", "-q"], env=env)
    assert r.returncode == 0, r.stderr
    pruned = LatencyTable.from_json(json.loads(r.stdout))
    assert pruned.fingerprint != written["fingerprint"] and set(pruned.modules) < set(written["modules"])
    assert len(list((tmp_path / "cache" / "latency").iterdir())) == 2
    # another architecture: its own entry; the first model's table named for it is refused
    r = run_cli(["prune", "--model", "random-llama:3", "--target", "0.3", "--budget", "latency", "--latency-table",
                 str(table), "--calib-samples", "2", "--seq-len", "16", "--out", str(tmp_path / "q")], env=env)
    assert_one_line_error(r, "measured on another model")
    assert not (tmp_path / "q").exists()
    r = run_cli(["prune", "--model", "random-llama:3", "--target", "0.3", "--budget", "latency", "--calib-samples", "2",
                 "--seq-len", "16", "--out", str(tmp_path / "q"), "-q"], env=env)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "cache" / "latency").iterdir())) == 3


@pytest.mark.unit
def test_latency_target_on_a_cnn_removes_the_slow_layer_it_counts():
    from depthprune.adapters.base import LoadedModel
    from depthprune.importance import PruneConfig, prune_to_target
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    lm = LoadedModel(model=model, example_inputs=(x,), spec="cnn")
    table = profile_latency(model, lambda m, b: m(*b), (x[:1],), rounds=1, warmup=0, progress=False)
    for n, e in table.modules.items():  # as if the middle convolution ran on a slow kernel
        e["s"] = 9.0 if n == "2" else 0.1
    table.total_s = sum(e["s"] for e in table.modules.values())
    _, out = prune_to_target(lm, PruneConfig(0.5, score="output", schedule="iterative", granularity="fine",
                                             compensate=False, budget="latency"), [(x,)], progress=False,
                             latency_table=table)
    assert out.budget == "latency" and out.reached and out.cost_before == table.total_s
    assert out.cost_after == table.estimate(model) <= 0.5 * out.cost_before
    # one step reached it through the slow layer: removed, or narrowed by width reconciliation
    # (the input convolution removed leaves 3 channels: 3 x 3 x 9 of its 8 x 8 x 9 + 8 weights)
    assert len(out.applied) == 1 and out.applied[0]["unit"] in ("0", "2")
    slow = model[2]
    left = 0.0 if not isinstance(slow, nn.Conv2d) else 9.0 * sum(p.numel() for p in slow.parameters()) / (8 * 8 * 9 + 8)
    assert out.cost_after == pytest.approx(left + 0.1 * (len(table.modules) - 1) - _gone(table, model))


@pytest.mark.unit
def test_decode_table_times_one_step_with_the_cache_and_round_trips():
    from depthprune.eval.speed import decode_step
    lm = wrap(random_llama(2), "random-llama:2")
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    fwd, inputs = decode_step(lm.model, prompt)
    assert inputs[0].shape == (1, 1)
    t = profile_latency(lm.model, fwd, inputs, rounds=2, warmup=1, progress=False, decode_context=12)
    assert t.decode_context == 12 and t.shape == [[1, 1]]
    assert {"model.layers.0.self_attn", "model.layers.1.mlp.down_proj"} <= set(t.modules)
    assert t.estimate(lm.model) == pytest.approx(t.total_s, rel=1e-9)
    assert LatencyTable.from_json(json.loads(json.dumps(t.to_json()))) == t
    # a table written before decode tables existed reads as a plain forward's
    old = t.to_json()
    del old["decode_context"]
    assert LatencyTable.from_json(old).decode_context == 0


@pytest.mark.integration
def test_cli_profile_decode_writes_a_decode_table_and_refuses_models_without_a_cache(tmp_path):
    out = tmp_path / "d.json"
    r = run_cli(["profile", "--model", "random-llama:2", "--decode", "--seq-len", "8", "--rounds", "1", "--out",
                 str(out), "-q"])
    assert r.returncode == 0, r.stderr
    assert "decode step after 8 cached tokens" in r.stdout
    table = LatencyTable.from_json(json.loads(out.read_text()))
    assert table.decode_context == 8 and table.shape == [[1, 1]]
    r = run_cli(["profile", "--model", "yolov5n.yaml", "--decode", "--out", str(tmp_path / "y.json"), "-q"])
    assert_one_line_error(r, "not a causal language model")
    assert not (tmp_path / "y.json").exists()
