"""Wall-clock speed on this machine: prefill latency and decode throughput of causal LMs (KV cache
on), latency of other models, peak memory.

Every figure is the median of ``repeats`` runs after ``warmup`` runs, and the models compared are
measured *interleaved* (run r of every model, then run r+1 of every model), so a noisy machine
slows all of them alike and the ratios stay honest. Inputs are random token ids / images: speed
does not depend on weight or input values.
"""
from __future__ import annotations

import inspect
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..io.model_dir import open_model
from .dense import dense_architecture

#: (batch, tokens) of the prefill workloads
PREFILL = ((1, 256), (8, 128))


@dataclass
class SpeedSettings:
    prefill: tuple = PREFILL
    decode_prompt: int = 128  # tokens in the prompt before decoding
    decode_tokens: int = 32   # tokens decoded one at a time with the KV cache
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


def _ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward over the prompt, no cache kept."""
    model(input_ids=ids, use_cache=False)


def _cache_name(model: nn.Module) -> str:
    """The KV-cache keyword of a transformers forward (``cache`` since 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode(model: nn.Module, prompt: torch.Tensor, n: int) -> float:
    """Seconds to decode ``n`` tokens greedily, one at a time with the KV cache, after a prefill of
    ``prompt`` (the prefill is not counted)."""
    name = _cache_name(model)
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out[name], out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=nxt, use_cache=True, **{name: cache})
        cache, nxt = out[name], out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def decode_step(model: nn.Module, prompt: torch.Tensor) -> tuple[Callable, tuple]:
    """``(forward_fn, inputs)`` whose call is one greedy decode step of ``model`` with the KV
    cache of ``prompt`` (filled here, once): what `depthprune profile --decode` times. Each call
    appends its token to the cache, so the cache grows by one token per call."""
    name = _cache_name(model)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out[name], out.logits[:, -1:].argmax(-1)
    return (lambda m, b: m(input_ids=b[0], use_cache=True, **{name: cache})), (nxt,)


def lm_speed(models: dict[str, nn.Module], vocab: int, settings: SpeedSettings | None = None,
             progress: bool = True) -> dict[str, dict]:
    """Prefill latency (seconds per batch, per workload) and decode tokens/s of causal LMs, measured
    interleaved. Returns ``{name: {"prefill_b1x256_s": ..., "prefill_b8x128_s": ..., "decode_tokens_per_s": ...}}``."""
    from tqdm import tqdm
    s = settings or SpeedSettings()
    prompts = {(b, t): _ids(vocab, b, t, s.seed) for b, t in s.prefill}
    dprompt = _ids(vocab, 1, s.decode_prompt, s.seed + 1)
    times: dict[str, dict[str, list]] = {n: {} for n in models}
    for m in models.values():
        m.eval()
    total = (s.warmup + s.repeats) * len(models)
    bar = tqdm(total=total, desc="speed", unit="run", disable=not progress or None, leave=False)
    for r in range(s.warmup + s.repeats):
        for name, model in models.items():
            row = {f"prefill_b{b}x{t}_s": _timed(lambda: prefill(model, ids)) for (b, t), ids in prompts.items()}
            row["decode_s"] = decode(model, dprompt, s.decode_tokens)
            if r >= s.warmup:
                for k, v in row.items():
                    times[name].setdefault(k, []).append(v)
            bar.update()
    bar.close()
    out = {}
    for name, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        out[name] = {k: v for k, v in med.items() if k != "decode_s"}
        out[name]["decode_tokens_per_s"] = s.decode_tokens / med["decode_s"]
    return out


def module_speed(models: dict[str, nn.Module], inputs: tuple, forward: Callable, repeats: int = 5,
                 warmup: int = 1) -> dict[str, float]:
    """Median seconds of one ``forward(model, inputs)`` per model, measured interleaved."""
    times: dict[str, list] = {n: [] for n in models}
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for name, m in models.items():
                t = _timed(lambda: forward(m, inputs))
                if r >= warmup:
                    times[name].append(t)
    return {n: statistics.median(v) for n, v in times.items()}


def threads() -> int:
    """Intra-op threads torch uses for these measurements."""
    return torch.get_num_threads()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, tied tensors once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def peak_memory_subprocess(code: str, env: dict | None = None) -> int:
    """Peak resident bytes of a fresh Python process running ``code`` (ru_maxrss of the child)."""
    probe = ("import resource, sys\n" + code +
             "\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "memory probe failed")
    line = [l for l in r.stdout.splitlines() if l.startswith("PEAK ")][-1]
    return int(line.split()[1])


def lm_memory_workload(spec_or_dir: str, dense: bool = False, settings: SpeedSettings | None = None) -> None:
    """Load a causal LM (``dense``: the randomly initialised base architecture of an output
    directory) and run the speed workloads once: what `lm_peak_memory` measures."""
    lm = dense_architecture(spec_or_dir) if dense else open_model(spec_or_dir)[0]
    s = settings or SpeedSettings()
    vocab = lm.model.config.vocab_size
    for b, t in s.prefill:
        prefill(lm.model, _ids(vocab, b, t, s.seed))
    decode(lm.model, _ids(vocab, 1, s.decode_prompt, s.seed), s.decode_tokens)


def lm_peak_memory(spec_or_dir: str, dense: bool = False) -> int:
    """Peak resident bytes of a fresh process that loads the model and runs the speed workloads
    (python and torch included: compare models by the difference)."""
    code = (f"import torch; torch.set_num_threads({threads()})\n"
            f"from depthprune.eval.speed import lm_memory_workload\n"
            f"lm_memory_workload({spec_or_dir!r}, dense={dense!r})")
    return peak_memory_subprocess(code, env={**os.environ, "TQDM_DISABLE": "1"})
