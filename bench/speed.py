"""Wall-clock speed of depth pruning against the alternatives, on SmolLM2-135M, in one run.

For dense and for 10/20/30 % parameter reduction by fine-grained depth pruning (the thesis's
paper schedule and a stronger schedule), sublayer and block removal, and torch-pruning width
pruning of every MLP to the same parameter count: prefill latency (batch 1 x 256 and
batch 8 x 128 tokens) and decode tokens/s with the KV cache, the median of interleaved runs
after warm-up (`depthprune.eval.speed`). Widths that are not multiples of 64 are flagged.

    python bench/speed.py [--threads 1] [--repeats 5] [--levels 0.1,0.2,0.3] [--configs ...]

A config is GRANULARITY:SCHEDULE[:SCORE[:K]] as in bench/depth.py, or ``width`` (torch-pruning).
The claim it tests: at small batch, depth pruning turns parameter reduction into speed nearly
1:1, width pruning does not.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
import torch_pruning as tp

from depthprune.adapters.load import calibration, load_model
from depthprune.depth import count_params
from depthprune.eval.speed import SpeedSettings, lm_speed
from depthprune.importance import PruneConfig, prune_to_target

CONFIGS = "fine:paper:angular,mixed:shared:ce,sublayer:paper:angular,block:paper:bi,width"


def width_prune(model: torch.nn.Module, example: torch.Tensor, target_params: int, align: int = 1) -> dict:
    """torch-pruning's own width pruning of every MLP (DepGraph groups, group L2-magnitude
    importance), the same number of intermediate channels from each, to remove ``target_params``
    parameters (rounded so every width stays a multiple of ``align``). Returns the widths."""
    layers = [m for m in model.modules() if hasattr(m, "up_proj") and hasattr(m, "down_proj")]
    per_channel = sum(p.numel() for p in (layers[0].gate_proj.weight[0], layers[0].up_proj.weight[0],
                                          layers[0].down_proj.weight[:, 0]))
    k = round(target_params / (per_channel * len(layers)))
    width = layers[0].up_proj.out_features
    k = width - max(align, (width - k) // align * align)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                               forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits)
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    for mlp in layers:
        group = dg.get_pruning_group(mlp.up_proj, tp.prune_linear_out_channels, list(range(width)))
        scores = imp(group)
        idxs = scores.argsort()[:k].tolist()
        dg.get_pruning_group(mlp.up_proj, tp.prune_linear_out_channels, idxs).prune()
    return {"mlp_width": width - k, "channels_removed_per_mlp": k}


def widths_not_64(model: torch.nn.Module) -> list[str]:
    """Linear layers with an in/out width that is not a multiple of 64."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (m.in_features % 64 or m.out_features % 64) and not n.endswith("lm_head")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--levels", default="0.1,0.2,0.3")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m", help="model spec (a Llama-style causal LM)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    base = load_model(a.model)
    batches = calibration(base, "shakespeare:calib", a.calib_samples, a.seq_len)
    dense_params = count_params(base.model)
    models = {"dense": base.model}
    info = {"dense": {"params": dense_params, "reduction": 0.0, "not64": []}}
    for lvl in (float(x) for x in a.levels.split(",")):
        for cfg in a.configs.split(","):
            name = f"{cfg} @{lvl:.0%}"
            lm = dataclasses.replace(base, model=copy.deepcopy(base.model))
            if cfg.startswith("width"):
                extra = width_prune(lm.model, base.example_inputs[0], int(lvl * dense_params),
                                    align=64 if cfg == "width64" else 1)
            else:
                gran, sched, *rest = cfg.split(":")
                score = rest[0] if rest else "angular"
                top = int(rest[1]) if len(rest) > 1 else 0
                prune_to_target(lm, PruneConfig(lvl, score, sched, gran, rescore_top=top, compensate=False), batches,
                                progress=False)
                extra = {}
            p = count_params(lm.model)
            models[name] = lm.model
            info[name] = {"params": p, "reduction": 1 - p / dense_params, "not64": widths_not_64(lm.model), **extra}
            print(f"pruned {name}: {1 - p / dense_params:.1%} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    settings = SpeedSettings(repeats=a.repeats)
    res = lm_speed(models, base.model.config.vocab_size, settings, progress=False)
    d = res["dense"]
    print(f"\n{a.model} on CPU, {a.threads} thread(s), median of {a.repeats} interleaved runs after "
          f"{settings.warmup} warm-up; speed-up = dense time / pruned time (decode: tokens/s ratio)\n")
    print("| model | reduction | prefill 1x256 (ms) | prefill 8x128 (ms) | decode (tok/s) | speed-up 1x256 | "
          "speed-up 8x128 | speed-up decode | widths not /64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        i = info[name]
        flag = f"{len(i['not64'])} layers" + (f" (MLP {i['mlp_width']})" if "mlp_width" in i else "") \
            if i["not64"] else "-"
        print(f"| {name} | {i['reduction']:.1%} | {1000 * r['prefill_b1x256_s']:.1f} | {1000 * r['prefill_b8x128_s']:.1f} "
              f"| {r['decode_tokens_per_s']:.1f} | {d['prefill_b1x256_s'] / r['prefill_b1x256_s']:.2f} | "
              f"{d['prefill_b8x128_s'] / r['prefill_b8x128_s']:.2f} | "
              f"{r['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f} | {flag} |")
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
