"""Scale: memory and time of scoring (and sparsifying) a Llama-2-7B-*shaped* model block by block.

Builds a ``transformers.LlamaConfig`` model of the given shape (default Llama-2-7B: hidden 4096,
MLP 11008, 32 heads, vocab 32000, with ``--layers 4``) in bf16 with random weights (built on the
meta device, then filled with N(0, 0.02) and ones for the norms: no download, no slow init),
wraps it as the ``python:`` route does (`depthprune.adapters.hf.wrap_user_model`), and scores
every fine unit with the angular score, one block at a time (`AngularScorer` caches the block
inputs; a candidate costs one forward of its own block). Calibration: ``--windows`` windows of
``--seq-len`` *random* token ids (no Llama-2 tokenizer here, and with random weights the text
would not matter).

``--offload disk``: the weights are written once by a child process to ``--offload-dir`` and the
measured process builds the model on the meta device and attaches accelerate's `disk_offload`
hooks, so a forward holds one layer's weights at a time; the block being scored is made resident
with `depthprune.offload.resident` (accelerate's own loader and hooks) and offloaded again after.

Prints the figures, then one line ``JSON {...}``; ``--json PATH`` also writes them.

    nice -n 10 python bench/scale.py                       # 7B-shaped, 4 layers, in memory
    nice -n 10 python bench/scale.py --offload disk        # the same, weights on disk
    python bench/scale.py --hidden 64 --intermediate 128 --heads 4 --layers 2 --vocab 128   # tiny
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

GIB = 1024 ** 3


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def config(a):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       max_position_embeddings=max(4096, a.seq_len), tie_word_embeddings=False, use_cache=False)


def param_arithmetic(cfg) -> dict:
    """Parameters of a Llama of this config by hand: embeddings, LM head, final norm, and per
    block q/k/v/o, gate/up/down and two norms."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    attn = 2 * h * h + 2 * h * kv
    mlp = 3 * h * i
    block = attn + mlp + 2 * h
    return {"attention": attn, "mlp": mlp, "block": block, "embeddings": v * h, "lm_head": v * h,
            "total": 2 * v * h + h + cfg.num_hidden_layers * block}


def empty_model(cfg, dtype=torch.bfloat16):
    """The model with every parameter on the meta device in ``dtype`` (buffers real), built in milliseconds."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = LlamaForCausalLM(cfg).eval()
    for m in model.modules():  # bf16 parameters (accelerate casts loaded values to the parameter's dtype)
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"))
    return model


def fill_random(model, seed: int, dtype=torch.bfloat16) -> None:
    """Real ``dtype`` weights in place of meta ones: N(0, 0.02) for matrices, ones for norms."""
    from accelerate.utils import set_module_tensor_to_device
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()):
        t = torch.ones(p.shape, dtype=dtype) if p.dim() == 1 else torch.empty(p.shape, dtype=dtype).normal_(0, 0.02,
                                                                                                        generator=g)
        set_module_tensor_to_device(model, name, "cpu", value=t)


def write_offload(a) -> None:
    """Child process: build the random model and write it in accelerate's disk-offload format."""
    from accelerate.utils import offload_state_dict
    model = empty_model(config(a))
    fill_random(model, a.seed)
    offload_state_dict(a.offload_dir, model.state_dict())


def calibration_ids(cfg, windows: int, seq_len: int, batch: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (windows, seq_len), generator=g)
    return [(ids[k:k + batch],) for k in range(0, windows, batch)]


def run(a) -> dict:
    from depthprune.adapters.hf import wrap_user_model
    from depthprune.depth.engine import DepthPruner, count_params
    from depthprune.importance import AngularScorer, make_groups
    from depthprune.offload import resident

    torch.set_num_threads(a.threads)
    cfg = config(a)
    want = param_arithmetic(cfg)
    out: dict = {"shape": {k: getattr(a, k) for k in ("hidden", "intermediate", "heads", "layers", "vocab")},
                 "dtype": "bfloat16", "threads": a.threads, "offload": a.offload,
                 "calibration": {"windows": a.windows, "seq_len": a.seq_len, "batch": a.batch,
                                 "ids": "random token ids (seeded)"},
                 "arithmetic": want, "phases": {}}
    phases = out["phases"]

    def mark(name: str, t0: float) -> None:
        phases[name] = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss": peak_rss(), "rss": rss()}
        print(f"[{name}] {phases[name]['seconds']:.1f} s, peak RSS {peak_rss() / GIB:.2f} GiB", file=sys.stderr,
              flush=True)

    out["rss_start"] = rss()
    t_all = t0 = time.perf_counter()
    model = empty_model(cfg)
    if a.offload == "disk":
        from accelerate import disk_offload
        disk_offload(model, a.offload_dir, execution_device=torch.device("cpu"))
    else:
        fill_random(model, a.seed)
    example = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(a.seed))
    lm = wrap_user_model(model, (example,), "python:bench.scale:model")
    out["params"] = count_params(lm.model)
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in {id(p): p for p in lm.model.parameters()}.values())
    out["block_bytes"] = want["block"] * 2
    mark("build", t0)

    t0 = time.perf_counter()
    pruner = DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe, on_change=lm.on_change)
    mark("trace", t0)

    t0 = time.perf_counter()
    batches = calibration_ids(cfg, a.windows, a.seq_len, a.batch, a.seed)
    scorer = AngularScorer(lm.model, batches, lm.forward_fn, progress=False)
    groups = make_groups(pruner, "fine")
    mark("cache_block_states", t0)

    scores, per_block = {}, []
    t_score = time.perf_counter()
    for b, (path, block) in enumerate(scorer.blocks):
        mine = [g for g in groups if g.block == b]
        t0 = time.perf_counter()
        with resident(block) if a.offload == "disk" else nullcontext():
            scores.update(scorer.score(pruner, mine))
        per_block.append({"block": path, "units": len(mine), "seconds": round(time.perf_counter() - t0, 3),
                          "peak_rss": peak_rss(), "rss": rss()})
    mark("score", t_score)
    out["units"] = {"candidates": len(groups), "scored": sum(1 for v in scores.values() if v != float("inf")),
                    "outside_blocks": sum(1 for g in groups if g.block is None)}
    out["scores"] = {k: round(v, 6) for k, v in scores.items()}
    out["per_block"] = per_block

    if a.sparsity != "none":
        from depthprune.sparsity import sparsify
        from depthprune.sparsity.sparsify import nonzero
        t0 = time.perf_counter()
        rep = sparsify(lm.model, a.sparsity, lm.example_inputs, lm.forward_fn, batches, sparsity=0.5,
                       progress=False)
        mark("sparsify", t0)
        out["sparsify"] = {"method": a.sparsity, "mode": rep["mode"], "layers": len(rep["layers"]),
                           "sparsity_reported": round(sum(r["sparsity"] for r in rep["layers"].values())
                                                      / len(rep["layers"]), 4)}
        if a.offload == "none":
            out["sparsify"]["nonzero_after"] = nonzero(lm.model)
    out["total_seconds"] = round(time.perf_counter() - t_all, 3)
    out["peak_rss"] = peak_rss()
    out["peak_over_model"] = round(out["peak_rss"] / out["model_bytes"], 3)
    out["peak_minus_start_over_block"] = round((out["peak_rss"] - out["rss_start"]) / out["block_bytes"], 3)
    return out


def report(o: dict) -> None:
    print(f"shape {o['shape']} bf16, threads {o['threads']}, offload {o['offload']}")
    print(f"params {o['params']:,} (arithmetic {o['arithmetic']['total']:,}); model {o['model_bytes'] / GIB:.3f} GiB, "
          f"one block {o['block_bytes'] / GIB:.3f} GiB")
    for k, v in o["phases"].items():
        print(f"  {k:20s} {v['seconds']:9.1f} s   peak RSS {v['peak_rss'] / GIB:6.2f} GiB   RSS {v['rss'] / GIB:6.2f} GiB")
    for r in o["per_block"]:
        print(f"  {r['block']:20s} {r['units']} units {r['seconds']:9.1f} s   peak RSS {r['peak_rss'] / GIB:6.2f} GiB")
    print(f"units scored {o['units']['scored']}/{o['units']['candidates']}; total {o['total_seconds']:.1f} s; "
          f"peak RSS {o['peak_rss'] / GIB:.2f} GiB = {o['peak_over_model']:.2f} x model "
          f"(start {o['rss_start'] / GIB:.2f} GiB; above start {o['peak_minus_start_over_block']:.2f} x one block)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="windows per calibration batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--offload", choices=("none", "disk"), default="none")
    ap.add_argument("--offload-dir", help="where disk offload keeps the weights (default: a temporary folder)")
    ap.add_argument("--sparsity", choices=("none", "wanda", "stade"), default="none",
                    help="also sparsify to 50 %% block by block with this method")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--write-offload", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.write_offload:
        write_offload(a)
        return
    tmp = None
    if a.offload == "disk" and a.offload_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="depthprune-scale-")
        a.offload_dir = tmp.name
    try:
        if a.offload == "disk" and not os.path.isfile(os.path.join(a.offload_dir, "index.json")):
            # the weights never pass through the measured process
            subprocess.run([sys.executable, os.path.abspath(__file__), "--write-offload", *(argv or sys.argv[1:]),
                            "--offload-dir", a.offload_dir],
                           check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        o = run(a)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report(o)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(o, f, indent=1)
    print("JSON " + json.dumps(o))


if __name__ == "__main__":
    main()
