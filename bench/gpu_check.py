"""GPU check: a Llama-2-7B-shaped bfloat16 model pruned on the GPU, exported and timed.

    python bench/gpu_check.py [--layers 32] [--target 0.2] [--work /tmp/gpu-check] [-- PRUNE FLAGS...]

Builds a config-built Llama-2-7B-shaped model (random weights, bf16, 32 layers, hidden 4096, MLP
11008, 32 heads) as a Hugging Face directory, runs ``depthprune prune --target 0.2 --device cuda
--dtype bfloat16`` on it (the default selection unless prune flags follow ``--``), exports the
result (``--format depthprune``), and times greedy KV-cache decoding of the dense and the pruned
model, interleaved. Prints wall time per phase, peak GPU memory and the decode speed-up. Without
a CUDA GPU it says so and exits 0. Random weights make the selection meaningless for quality;
the figures are about memory and time.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path


def build_dense(d: Path, layers: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(d)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - t0


def decode_tokens_per_s(model, steps: int = 128, prompt: int = 32) -> float:
    import torch
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    model.config.use_cache = True
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--target", default="0.2")
    ap.add_argument("--work", default="/tmp/depthprune-gpu-check")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("prune_flags", nargs="*", help="extra `depthprune prune` flags (after --)")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to measure (run this on a machine with one)")
        return 0
    from depthprune.cli import main as cli
    from depthprune.io.model_dir import load_pruned
    from depthprune.placement import Placement
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dense_dir, out, exp = work / "dense", work / "pruned", work / "export"
    phases = {"build and save the dense model": build_dense(dense_dir, a.layers)}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    code = cli(["prune", "--model", str(dense_dir), "--target", a.target, "--device", "cuda", "--dtype", "bfloat16",
                "--out", str(out), *a.prune_flags])
    phases["prune (load, select, prune, write)"] = time.perf_counter() - t0
    peak_prune = torch.cuda.max_memory_allocated()
    if code != 0:
        print(f"gpu_check: prune exited {code}")
        return code
    t0 = time.perf_counter()
    code = cli(["export", str(out), "--format", "depthprune", "--device", "cuda", "--out", str(exp)])
    phases["export"] = time.perf_counter() - t0
    if code != 0:
        return code
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).to("cuda").eval()
    pruned, _ = load_pruned(out, placement=Placement("cuda", "bfloat16"))
    speeds: dict[str, list[float]] = {"dense": [], "pruned": []}
    decode_tokens_per_s(dense, 8), decode_tokens_per_s(pruned.model, 8)  # warm-up
    for _ in range(a.repeats):  # interleaved
        speeds["dense"].append(decode_tokens_per_s(dense))
        speeds["pruned"].append(decode_tokens_per_s(pruned.model))
    dense_p = sum(p.numel() for p in dense.parameters())
    pruned_p = sum(p.numel() for p in pruned.model.parameters())
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    for k, v in phases.items():
        print(f"{k:<40} {v:8.1f} s")
    print(f"peak GPU memory while pruning: {peak_prune / 2**30:.1f} GiB")
    print(f"parameters: {dense_p:,d} -> {pruned_p:,d} ({100 * (1 - pruned_p / dense_p):.1f} % fewer)")
    md, mp = statistics.median(speeds["dense"]), statistics.median(speeds["pruned"])
    print(f"decode (batch 1, 128 tokens, KV cache): dense {md:.1f} tok/s, pruned {mp:.1f} tok/s, "
          f"speed-up x{mp / md:.2f} (median of {a.repeats}, interleaved; runs: {speeds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
