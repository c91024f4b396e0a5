"""`depthprune demo`: the whole pipeline on the packaged SmolLM2-135M and packaged text.

Scores every unit and depth-prunes the model to 20 % fewer parameters, fine-grained, with the
project's default schedule for language models (`DEMO_PRUNE`, with training-free compensation);
sparsifies the surviving layers with STADE at 50 %; evaluates the dense, the depth-pruned and
the depth-pruned + sparse models (held-out perplexity on Hamlet, prefill/decode speed measured
interleaved, a greedy sample from each); writes the final model to ``--out`` (an
`io.outdir.OutputDir`) with ``report.json`` and ``report.html``, and prints where they are.
"""
from __future__ import annotations

import copy
import time

#: what the demo runs: the default of `depthprune prune --target` for causal LMs
#: (fine units, angular scores, Algorithm 8, compensation: 92.8 Hamlet perplexity at 20 % (8 x 256 calibration tokens) against the
#: dense 49.7 in bench/depth.py; `ce` with `shared-iterative` scores better uncompensated but
#: costs ~4 s per unit per score on 2 cores, past the demo's 15 minutes)
DEMO_PRUNE = dict(target=0.2, score="angular", schedule="paper", granularity="fine", rescore_top=0,
                  compensate=True)
DEMO_SPARSITY = dict(method="stade", sparsity=0.5)
CALIB = dict(text="shakespeare:calib", samples=4, seq_len=256)
EVAL_TEXT = "shakespeare:eval"
PROMPT = "Friends, Romans, countrymen,"


def run(args) -> int:
    from .args import finish_output
    from ..io.outdir import OutputDir
    progress = not getattr(args, "quiet", False)
    with OutputDir(args.out, force=args.force, protect=["smollm2-135m"], command="demo") as od:
        files, lm, summary = _demo(progress)
        finish_output(od, files, lm)
    page = od.path / "report.html"
    for line in summary:
        print(line)
    print(f"wrote {args.out}; open {page}")
    return 0


def _sample(model, tokenizer, n: int = 24) -> str:
    import torch
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model.config.use_cache = True
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
    model.config.use_cache = False
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _demo(progress: bool) -> tuple[dict, object, list[str]]:
    from ..adapters.load import calibration, load_model
    from ..adapters.text import load_text
    from ..depth import count_params
    from ..depth.plan import fingerprint
    from ..eval.lm import perplexity_entry
    from ..eval.speed import SpeedSettings, lm_speed, threads
    from ..importance import PruneConfig, prune_to_target
    from ..io.model_dir import SPARSITY, pruned_files
    from ..io.report import command_report
    from ..progress import status
    from ..sparsity import sparsify
    from ..sparsity.sparsify import nonzero
    t_start = time.perf_counter()
    lm = load_model("smollm2-135m", progress=progress)
    fp = fingerprint(lm.model)
    dense = copy.deepcopy(lm.model)
    batches = calibration(lm, CALIB["text"], CALIB["samples"], CALIB["seq_len"])
    before = count_params(lm.model)
    status(f"depth pruning to {DEMO_PRUNE['target']:.0%} fewer parameters ({DEMO_PRUNE['granularity']} units, "
           f"{DEMO_PRUNE['score']} score, {DEMO_PRUNE['schedule']} schedule, compensation)", progress)
    t0 = time.perf_counter()
    pruner, outcome = prune_to_target(lm, PruneConfig(**DEMO_PRUNE), batches, progress=progress)
    prune_seconds = time.perf_counter() - t0
    after = count_params(lm.model)
    depth = copy.deepcopy(lm.model)
    status(f"sparsifying the surviving layers: {DEMO_SPARSITY['method']} at {DEMO_SPARSITY['sparsity']:.0%}", progress)
    t0 = time.perf_counter()
    nz_before = nonzero(lm.model)
    sp = sparsify(lm.model, DEMO_SPARSITY["method"], lm.example_inputs, lm.forward_fn, batches,
                  sparsity=DEMO_SPARSITY["sparsity"], progress=progress)
    sparsify_seconds = time.perf_counter() - t0
    models = {"dense": dense, "depth": depth, "depth+sparse": lm.model}
    text = load_text(EVAL_TEXT)
    status("evaluating dense, depth-pruned and depth-pruned + sparse models", progress)
    ppl = {k: perplexity_entry(m, lm.tokenizer, text, EVAL_TEXT)["value"] for k, m in models.items()}
    settings = SpeedSettings(repeats=3)
    speed = lm_speed(models, lm.model.config.vocab_size, settings, progress)
    samples = {k: _sample(m, lm.tokenizer) for k, m in models.items()}
    params = {"dense": before, "depth": after, "depth+sparse": after}
    nonzeros = {k: nonzero(m) for k, m in models.items()}
    ev = {"command": "depthprune demo", "perplexity": {"text": EVAL_TEXT, "window": 256, "stride": 256,
                                                       "max_windows": 16, "value": ppl["depth+sparse"],
                                                       "dense": ppl["dense"]},
          "params": after, "dense_params": before, "reduction": 1 - after / before,
          "latency_ms": 1000 * speed["depth+sparse"]["prefill_b1x256_s"],
          "dense": {"perplexity": ppl["dense"], "latency_ms": 1000 * speed["dense"]["prefill_b1x256_s"]},
          "variants": {k: {"perplexity": ppl[k], "params": params[k], "nonzero": nonzeros[k], **speed[k],
                           "sample": samples[k]} for k in models},
          "speed": {"threads": threads(), "repeats": settings.repeats, "warmup": settings.warmup}}
    prune_report = {"model": "smollm2-135m", "params_before": before, "params_after": after,
                    "reduction": (before - after) / before, "target": DEMO_PRUNE["target"], "reached": outcome.reached,
                    "score": DEMO_PRUNE["score"], "schedule": DEMO_PRUNE["schedule"],
                    "granularity": DEMO_PRUNE["granularity"], "rescore_top": DEMO_PRUNE["rescore_top"],
                    "compensate": DEMO_PRUNE["compensate"], "compensation": outcome.compensation,
                    "calib": CALIB["text"], "calib_samples": CALIB["samples"], "seq_len": CALIB["seq_len"],
                    "scoring_seconds": outcome.scoring_seconds, "pruning_seconds": outcome.pruning_seconds,
                    "compensation_seconds": outcome.compensation_seconds, "seconds": prune_seconds,
                    "units": outcome.applied, "sample": samples["depth+sparse"]}
    sparsify_report = {"model": "smollm2-135m (depth-pruned)", **DEMO_SPARSITY, "nonzero_before": nz_before,
                       "nonzero_after": nonzeros["depth+sparse"], "seconds": sparsify_seconds,
                       "calibration": sp["mode"], "layers": list(sp["layers"].values())}
    report = command_report("demo", {**prune_report, "wall_seconds": time.perf_counter() - t_start})
    report.update(prune=prune_report, sparsify=sparsify_report, eval=ev)
    files = pruned_files(pruner, "smollm2-135m", fp, {"report.json": report,
                                                       SPARSITY: {"method": "stade", "added_bias": sp["added_bias"]}})
    summary = [f"parameters {before:,d} -> {after:,d} ({100 * (before - after) / before:.2f} % fewer) in "
               f"{prune_seconds:.0f} s; then {DEMO_SPARSITY['method']} {DEMO_SPARSITY['sparsity']:.0%}: non-zero "
               f"{nonzeros['depth']:,d} -> {nonzeros['depth+sparse']:,d}",
               "held-out perplexity (Hamlet): " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()),
               "prefill 1x256 (ms): " + ", ".join(f"{k} {1000 * speed[k]['prefill_b1x256_s']:.0f}" for k in models)
               + f"; decode tokens/s: " + ", ".join(f"{k} {speed[k]['decode_tokens_per_s']:.1f}" for k in models)
               + f" ({threads()} threads)",
               *[f"sample ({k}): {s!r}" for k, s in samples.items()],
               f"total {time.perf_counter() - t_start:.0f} s"]
    return files, lm, summary
