"""`depthprune eval`: evaluate a model spec or a pruned output directory, against its dense base.

For an output directory the dense base is rebuilt from ``structure.json`` (random weights: enough
for parameters, FLOPs and speed) and, for quality figures, loaded from the plan's base spec when
it can be loaded here.
"""
from __future__ import annotations

import shlex
import sys

from ..adapters import context_length
from ..adapters.text import load_text
from ..io.model_dir import is_model_dir, open_model
from ..errors import UserError
from .dense import dense_architecture, dense_weights
from .detect import detection_entry
from .lm import PPL_WINDOW, params_entry, perplexity_entry, speed_entry
from .speed import SpeedSettings, lm_peak_memory
from .tasks import run_tasks
from .text import tokenizer_of


def evaluate(spec_or_dir: str, text: str = "shakespeare:eval", speed: bool = False, data: str | None = None,
             tasks: list[str] | None = None, task_dir: str | None = None, limit: int | None = None,
             trust_code: bool = False, progress: bool = True, speed_settings: SpeedSettings | None = None,
             placement=None) -> dict:
    """The ``eval`` section of report.json (see docs/guide.md); ``placement``: the device and
    dtype the model (and its dense base) are evaluated in."""
    lm, plan = open_model(spec_or_dir, trust_code, trust_code, placement=placement)
    is_dir = is_model_dir(spec_or_dir)
    dense = dense_architecture(spec_or_dir, trust_code) if is_dir else None
    out: dict = {"command": "depthprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""}
    if lm.adapter.data == "text":
        ctx = context_length(lm)
        if speed:  # before any long work
            s = speed_settings or SpeedSettings()
            need = max([t for _, t in s.prefill] + [s.decode_prompt + s.decode_tokens])
            if (ctx or need) < need:
                raise UserError(f"--speed times prompts of up to {need} tokens; {lm.spec}'s context is {ctx} tokens")
        out.update(params_entry(lm.model, dense.model if dense else None))
        body = load_text(text, "--text")
        window = min(PPL_WINDOW, ctx or PPL_WINDOW)  # a model with a shorter context: its own
        out["perplexity"] = perplexity_entry(lm.model, tokenizer_of(lm), body, text, window)
        if is_dir:
            base = dense_weights(plan, trust_code, placement)
            if base is not None:
                out["perplexity"]["dense"] = perplexity_entry(base.model, tokenizer_of(base), body, text,
                                                              window)["value"]
                del base
        if speed:
            out["speed"] = speed_entry(lm.model, dense.model if dense else None, lm.model.config.vocab_size,
                                       speed_settings, progress)
            out["speed"]["pruned"]["peak_rss_bytes"] = lm_peak_memory(spec_or_dir)
            if dense is not None:
                out["speed"]["dense"]["peak_rss_bytes"] = lm_peak_memory(spec_or_dir, dense=True)
        if tasks:
            out["tasks"] = run_tasks(lm.model, lm.tokenizer, tasks, task_dir, limit)
    elif lm.adapter.data == "images":
        if tasks:
            raise UserError("--tasks are lm-evaluation-harness tasks; this is a detector (use --data)")
        imgsz = int(lm.example_inputs[0].shape[-1])
        out.update(detection_entry(lm.model, lm.forward_fn, imgsz, dense.model if dense else None, data, speed))
    else:
        raise UserError(f"no evaluation for {lm.family} models yet (causal LMs and ultralytics detectors)")
    return _with_curve_keys(out)


def _with_curve_keys(out: dict) -> dict:
    """The headline figures again under the keys trade-off curves read (`depthprune.viz.curves`):
    ``latency_ms`` (batch-1 prefill of 256 tokens, or one detector image) and ``dense`` (the
    dense base's figures, plotted at reduction 0)."""
    dense: dict = {}
    speed, lat = out.get("speed"), out.get("latency")
    if speed:
        key = next(k for k in speed["pruned"] if k.startswith("prefill"))
        out["latency_ms"] = 1000 * speed["pruned"][key]
        if "dense" in speed:
            dense["latency_ms"] = 1000 * speed["dense"][key]
    if lat:
        out["latency_ms"] = 1000 * lat["pruned_s"]
        if "dense_s" in lat:
            dense["latency_ms"] = 1000 * lat["dense_s"]
    if "dense" in (out.get("perplexity") or {}):
        dense["perplexity"] = out["perplexity"]["dense"]
    if dense:
        out["dense"] = dense
    return out
