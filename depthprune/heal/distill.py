"""Knowledge distillation of a pruned causal LM from its dense base (docs/guide.md, "Heal").

Pieces, each usable alone:

- `distill_loss`: the loss as a pure function of student logits, teacher logits and token ids
  (KL on temperature-softened next-token distributions, times T², optionally plus next-token
  cross-entropy);
- `load_training_text` / `split_windows`: text from a ``--calib``-style spec or a directory of
  text files, cut into non-overlapping token windows, the last share held out for evaluation;
- `select_parameters`: what trains (``all``, ``lora:R`` with peft, merged before saving, or
  ``last:N``: the last N surviving blocks, the final norm and the LM head);
- `heal`: the loop on `accelerate` (one CPU or GPU without a launcher; data-parallel under
  ``torchrun``/``accelerate launch``): a step or token budget, gradient accumulation, held-out
  evaluation with early stopping, checkpoints (safetensors + JSON, nothing pickled) that resume
  to the same weights as an uninterrupted run.

Determinism: the order of the training windows is a permutation seeded by ``seed`` and the
epoch; the micro-batch of optimizer step ``s`` depends only on ``s``, so a resumed run reads the
same windows; a global batch of ``batch_size`` windows is split evenly over the processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import get_scheduler

from ..adapters.text import check_text_spec, load_text
from ..errors import UserError

LOSSES = ("kd", "ce", "kd+ce")
#: learning-rate schedules after the warm-up (transformers' ``get_scheduler``): constant, or
#: decaying linearly / along a cosine to 0 at the last step
LR_SCHEDULES = ("constant", "linear", "cosine")
BEST = "best."  # checkpoint key prefix of the best evaluation's trainable tensors
TRAIN_HELP = "all, lora:R (LoRA of rank R, merged before saving) or last:N (the last N surviving blocks)"


# --------------------------------------------------------------------------- the loss
def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, ids: torch.Tensor,
                 loss: str = "kd", temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token loss of a batch (``[batch, seq, vocab]`` logits, ``[batch, seq]`` ids) over
    the next-token positions (every position but the last):

    - ``kd``: KL(teacher ‖ student) of the distributions softened by ``temperature``, times
      ``temperature²`` (Hinton et al.; the gradient's scale does not change with T);
    - ``ce``: next-token cross-entropy against ``ids`` (the teacher is not used);
    - ``kd+ce``: their sum.
    Computed in float32 whatever the logits' dtype."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}")
    s = student_logits[:, :-1].float()
    vocab = s.shape[-1]
    total = s.new_zeros(())
    if loss in ("kd", "kd+ce"):
        if teacher_logits is None:
            raise ValueError("the kd loss needs teacher logits")
        t = teacher_logits[:, :-1].to(s.device).float()
        if t.shape != s.shape:
            raise UserError(f"the teacher's logits {tuple(t.shape)} and the student's {tuple(s.shape)} differ: "
                            "the teacher is not this model's base (another vocabulary?)")
        log_p_s = F.log_softmax(s.reshape(-1, vocab) / temperature, dim=-1)
        log_p_t = F.log_softmax(t.reshape(-1, vocab) / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        total = total + kl * temperature ** 2
    if loss in ("ce", "kd+ce"):
        total = total + F.cross_entropy(s.reshape(-1, vocab), ids[:, 1:].to(s.device).reshape(-1))
    return total


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- text and windows
def load_training_text(spec: str, flag: str = "--text") -> str:
    """The text of ``spec``: ``shakespeare:calib``, ``shakespeare:PLAY``, ``pydoc:reference``, a
    UTF-8 text file, or a directory of text files (every regular, non-hidden file in it, in name
    order; not recursive). A mistake is one line (`UserError`)."""
    if spec and os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if not n.startswith(".") and os.path.isfile(os.path.join(spec, n)))
        if not names:
            raise UserError(f"{flag} {spec} is a directory with no text files in it")
        parts = []
        for n in names:
            path = os.path.join(spec, n)
            check_text_spec(path, flag)
            parts.append(load_text(path, flag))
        return "\n".join(parts)
    check_text_spec(spec, flag)
    return load_text(spec, flag)


def split_windows(ids: torch.Tensor, seq_len: int, eval_fraction: float = 0.1,
                  eval_windows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[n]`` -> (training windows, held-out windows), each ``[k, seq_len]``,
    non-overlapping. The last ``eval_fraction`` of the tokens (at least one window) is held out;
    at most ``eval_windows`` held-out windows, spread evenly over it."""
    n = int(ids.numel())
    slots = n // seq_len
    held = max(1, round(slots * eval_fraction))
    if slots - held < 1:
        raise UserError(f"the text has {n} tokens: room for {slots} window(s) of {seq_len}, and training needs "
                        f"at least one besides the {held} held out (give more text or lower --seq-len)")
    windows = ids[:slots * seq_len].reshape(slots, seq_len)
    train, heldout = windows[:slots - held], windows[slots - held:]
    if len(heldout) > eval_windows:
        pick = torch.linspace(0, len(heldout) - 1, eval_windows).round().long()
        heldout = heldout[pick]
    return train.clone(), heldout.clone()


# --------------------------------------------------------------------------- what trains
def parse_train(text: str) -> tuple[str, int]:
    """``all`` -> ("all", 0); ``lora:R`` -> ("lora", R); ``last:N`` -> ("last", N)."""
    if text == "all":
        return "all", 0
    kind, _, num = text.partition(":")
    if kind in ("lora", "last") and num.isdigit() and int(num) >= 1:
        return kind, int(num)
    raise UserError(f"--train must be {TRAIN_HELP}, got {text!r}")


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` for transformers' models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError("--train last:N: this model has no list of blocks")
    return max(lists, key=len)


def _final_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The final norm and the LM head."""
    out = []
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "norm", None), nn.Module):
        out.append(("model.norm", inner.norm))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out.append(("lm_head", head))
    return out


def lora_targets(model: nn.Module) -> list[str]:
    """Every plain `nn.Linear` of the blocks (stand-ins of pruned layers are not Linear; the LM
    head is left out)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def select_parameters(model: nn.Module, train: str, seed: int = 0) -> nn.Module:
    """Set ``requires_grad`` for what ``train`` names (everything else frozen); returns the model
    to train (for ``lora:R`` a peft model wrapping ``model``, adapters initialised from ``seed``)."""
    kind, num = parse_train(train)
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if kind == "last":
        blocks = [b for b in _blocks(model) if any(True for _ in b.parameters())]  # surviving blocks
        if num > len(blocks):
            raise UserError(f"--train last:{num}: the model has {len(blocks)} surviving block(s)")
        for b in blocks[len(blocks) - num:]:
            for p in b.parameters():
                p.requires_grad_(True)
        for _, m in _final_modules(model):
            for p in m.parameters():
                p.requires_grad_(True)
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--train lora:R needs the peft package (pip install peft)") from None
    targets = lora_targets(model)
    if not targets:
        raise UserError("--train lora:R: the model has no Linear layer left to adapt")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=num, lora_alpha=2 * num, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, cfg)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """The base model with the LoRA adapters merged into its weights (a peft model), else ``model``."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_heldout(model: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, batch_size: int = 8,
                     temperature: float = 1.0) -> dict:
    """Held-out next-token perplexity of ``model`` and its mean per-token KL to ``teacher`` (at
    temperature 1; None without a teacher)."""
    was = model.training
    model.eval()
    device = _device(model)
    nll = kl = 0.0
    tokens = 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        s = _logits(model, x)
        n = x[:, 1:].numel()
        nll += float(distill_loss(s, None, x, "ce")) * n
        if teacher is not None:
            kl += float(distill_loss(s, _logits(teacher, x.to(_device(teacher))), x, "kd", 1.0)) * n
        tokens += n
    model.train(was)
    out = {"ppl": math.exp(nll / tokens), "ce": nll / tokens, "kl": kl / tokens if teacher is not None else None,
           "tokens": tokens}
    return out


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- the loop
@dataclass
class HealConfig:
    loss: str = "kd"
    train: str = "all"
    steps: int = 100                #: optimizer steps (the budget)
    lr: float = 1e-4                #: AdamW peak learning rate, no weight decay
    lr_schedule: str = "constant"   #: `LR_SCHEDULES`: after ``warmup`` steps, constant or decaying to 0 at ``steps``
    warmup: int = 0                 #: optimizer steps of linear warm-up from 0
    batch_size: int = 8             #: windows per optimizer step (global, over every process and micro-batch)
    grad_accum: int = 1             #: micro-batches per optimizer step
    temperature: float = 1.0
    eval_every: int = 0             #: 0: about ten evaluations over the budget
    patience: int = 0               #: stop after this many evaluations without improvement (0: never)
    seed: int = 0
    checkpoint_dir: str | None = None
    save_every: int = 0             #: 0: with a checkpoint directory, at every evaluation
    log_every: int = 0              #: 0: about twenty progress lines
    stop_after: int | None = None   #: test hook: raise KeyboardInterrupt after this step's checkpoint

    def fingerprint(self, extra: dict) -> str:
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("steps", "checkpoint_dir", "save_every", "log_every", "stop_after", "eval_every",
                             "patience")}
        text = json.dumps({**keep, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_accelerator(cpu: bool, device_placement: bool):
    """An `accelerate.Accelerator` (data-parallel when started by torchrun / accelerate launch)."""
    from accelerate import Accelerator
    return Accelerator(cpu=cpu, device_placement=device_placement)


def _objective(metrics: dict, loss: str) -> float:
    if loss == "kd":
        return metrics["kl"]
    if loss == "ce":
        return metrics["ce"]
    return metrics["kl"] + metrics["ce"]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Checkpoints:
    """Training state in a directory: ``state.safetensors`` (trainable tensors, optimizer state)
    and ``state.json`` (step, curve, early-stopping state, the run's fingerprint). Replaced
    atomically (written to a sibling, renamed)."""

    def __init__(self, directory: str, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def load(self) -> tuple[dict, dict] | None:
        meta_path = self.dir / "state.json"
        if not meta_path.is_file():
            return None
        from safetensors.torch import load_file
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(self.dir / "state.safetensors"))
        except (OSError, ValueError) as e:
            raise UserError(f"--checkpoint-dir {self.dir}: cannot read the checkpoint ({e}); remove it") from None
        if meta.get("fingerprint") != self.fingerprint:
            raise UserError(f"--checkpoint-dir {self.dir} holds the checkpoint of another run (other model, text "
                            "or training flags); remove it or give another directory")
        return meta, tensors

    def save(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".state-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, "fingerprint": self.fingerprint}))
        os.replace(tmp / "state.safetensors", self.dir / "state.safetensors")
        os.replace(tmp / "state.json", self.dir / "state.json")  # last: marks the pair complete
        tmp.rmdir()


def _state_tensors(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _restore(model: nn.Module, optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("param."):
                name = k[len("param."):]
                if name not in params:
                    raise UserError(f"the checkpoint names a parameter {name!r} the model does not have; remove it")
                params[name].copy_(v)
    sd = optimizer.state_dict()
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    sd["state"] = state
    optimizer.load_state_dict(sd)


def heal(student: nn.Module, teacher: nn.Module | None, train_windows: torch.Tensor, heldout: torch.Tensor,
         cfg: HealConfig, accelerator=None, log: Callable[[str], None] | None = None,
         fingerprint_extra: dict | None = None) -> tuple[nn.Module, dict]:
    """Train ``student`` (in place; for ``lora:R`` its weights get the merged adapters) on
    ``train_windows`` ``[n, seq_len]`` against ``teacher`` (frozen, no gradients; None for
    ``ce``). Returns ``(model, info)``: the model to save (eval mode, frozen) and what happened
    (budget, losses, held-out metrics before and after, the curve). With early stopping
    (``patience``), the model returned has the trained weights of the best held-out evaluation
    (``info["best_step"]``), not the last ones."""
    if cfg.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if not 0 <= cfg.warmup < max(cfg.steps, 1):
        raise UserError(f"--warmup must be fewer steps than the budget ({cfg.steps}), got {cfg.warmup}")
    if cfg.loss != "ce" and teacher is None:
        raise UserError(f"--loss {cfg.loss} needs a teacher")
    if accelerator is None:
        accelerator = make_accelerator(cpu=_device(student).type == "cpu", device_placement=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.batch_size // cfg.grad_accum if cfg.batch_size % cfg.grad_accum == 0 else 0
    if micro == 0 or micro % world:
        raise UserError(f"--batch-size {cfg.batch_size} must split evenly into --grad-accum {cfg.grad_accum} "
                        f"micro-batches over {world} process(es)")
    local = micro // world
    n_train = len(train_windows)
    per_epoch = n_train // micro
    if per_epoch < 1:
        raise UserError(f"the text gives {n_train} training window(s), fewer than one micro-batch of {micro} "
                        "(give more text, or lower --seq-len or --batch-size)")
    seq_len = train_windows.shape[1]
    eval_every = cfg.eval_every or max(1, cfg.steps // 10)
    log_every = cfg.log_every or max(1, cfg.steps // 20)
    save_every = cfg.save_every or eval_every
    say = log if (log is not None and accelerator.is_main_process) else (lambda _m: None)

    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model = select_parameters(student, cfg.train, cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler(f"{cfg.lr_schedule}_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule,
                              optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
    if teacher is not None and accelerator.device.type != "cpu" and _device(teacher).type == "cpu":
        teacher.to(accelerator.device)
    device = _device(model)

    fp = cfg.fingerprint({"windows": list(train_windows.shape), "sum": int(train_windows.sum()),
                          **(fingerprint_extra or {})})
    ckpt = _Checkpoints(cfg.checkpoint_dir, fp) if cfg.checkpoint_dir else None
    start, curve, best, bad, tokens, seconds_before, before = 0, [], None, 0, 0, 0.0, None
    best_step, best_weights = None, None  # with early stopping: the trainable tensors of the best evaluation
    resumed = ckpt.load() if ckpt else None
    if resumed is not None:
        meta, tensors = resumed
        _restore(model, optimizer, tensors)
        start, curve, best, bad = meta["step"], meta["curve"], meta["best"], meta["bad"]
        tokens, seconds_before, before = meta["tokens"], meta["seconds"], meta["before"]
        best_step = meta.get("best_step")
        best_weights = {k[len(BEST):]: v for k, v in tensors.items() if k.startswith(BEST)} or None
        say(f"finetune: resuming from step {start} ({ckpt.dir})")
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": a resumed schedule catches up
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            scheduler.step()
    if before is None:
        before = evaluate_heldout(model, teacher, heldout, local or 1)
        say(f"finetune: held-out perplexity {before['ppl']:.3f}" +
            (f", KL to the teacher {before['kl']:.4f}" if before["kl"] is not None else ""))

    perms: dict[int, torch.Tensor] = {}

    def batch_of(m: int) -> torch.Tensor:
        epoch, pos = divmod(m, per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        idx = perms[epoch][pos * micro:(pos + 1) * micro][rank * local:(rank + 1) * local]
        return train_windows[idx].to(device)

    stopped = "budget"
    t0 = time.perf_counter()
    window_loss, window_n = 0.0, 0
    ddp_model.train()
    step = start
    while step < cfg.steps:
        step_loss = torch.zeros((), device=device)
        for j in range(cfg.grad_accum):
            x = batch_of(step * cfg.grad_accum + j)
            sync = j == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(ddp_model)):
                t_logits = None
                if cfg.loss != "ce":
                    with torch.no_grad():
                        t_logits = _logits(teacher, x.to(_device(teacher)))
                loss = distill_loss(_logits(ddp_model, x), t_logits, x, cfg.loss, cfg.temperature) / cfg.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += cfg.batch_size * seq_len
        mean_loss = float(accelerator.reduce(step_loss, "mean")) if world > 1 else float(step_loss)
        window_loss += mean_loss
        window_n += 1
        point: dict[str, Any] = {"step": step, "loss": mean_loss, "tokens": tokens}
        if step % log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            rate = (step - start) * cfg.batch_size * seq_len / max(elapsed, 1e-9)
            left = elapsed / (step - start) * (cfg.steps - step)
            say(f"finetune: step {step}/{cfg.steps} loss {window_loss / window_n:.4f} {rate:,.0f} tokens/s "
                f"left {_fmt_time(left)}")
            window_loss, window_n = 0.0, 0
        if step % eval_every == 0 or step == cfg.steps:
            m = evaluate_heldout(model, teacher, heldout, local or 1)
            point["heldout_ppl"], point["heldout_kl"] = m["ppl"], m["kl"]
            obj = _objective(m, cfg.loss)
            if best is None or obj < best:
                best, bad, best_step = obj, 0, step
                if cfg.patience:  # kept off the training device: the weights to return if it gets worse
                    best_weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                    if p.requires_grad}
            else:
                bad += 1
            say(f"finetune: step {step} held-out perplexity {m['ppl']:.3f}" +
                (f", KL {m['kl']:.4f}" if m["kl"] is not None else ""))
            ddp_model.train()
        curve.append(point)
        early = cfg.patience and bad >= cfg.patience
        if early:
            stopped = "early"
        if ckpt and (step % save_every == 0 or early or step == cfg.steps or step == cfg.stop_after):
            if accelerator.is_main_process:
                ckpt.save({"step": step, "curve": curve, "best": best, "bad": bad, "tokens": tokens,
                           "seconds": seconds_before + time.perf_counter() - t0, "before": before,
                           "best_step": best_step},
                          {**_state_tensors(model, optimizer),
                           **{BEST + k: v for k, v in (best_weights or {}).items()}})
            accelerator.wait_for_everyone()
        if cfg.stop_after is not None and step == cfg.stop_after:
            raise KeyboardInterrupt(f"stopped after step {step} (test hook)")
        if early:
            say(f"finetune: no held-out improvement in {cfg.patience} evaluation(s): stopping at step {step}")
            break
    if cfg.patience and best_weights is not None and best_step != step:  # back to the best evaluation's weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_weights:
                    p.copy_(best_weights[n])
        say(f"finetune: keeping the weights of step {best_step}, the best held-out evaluation")
    after = evaluate_heldout(model, teacher, heldout, local or 1)
    seconds = seconds_before + time.perf_counter() - t0
    out = merge_lora(accelerator.unwrap_model(ddp_model))
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    info = {"loss": cfg.loss, "train": cfg.train, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "warmup": cfg.warmup, "best_step": best_step, "temperature": cfg.temperature,
            "steps": cfg.steps, "steps_done": step, "tokens": tokens, "seq_len": seq_len,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": world,
            "trainable_params": n_trainable, "stopped": stopped, "resumed_from": start if resumed else None,
            "train_windows": n_train, "heldout_windows": len(heldout),
            "heldout_before": before, "heldout_after": after,
            "final_loss": curve[-1]["loss"] if curve else None, "curve": curve, "train_seconds": seconds}
    return out, info


def stderr_log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


__all__ = ["LOSSES", "LR_SCHEDULES", "HealConfig", "distill_loss", "evaluate_heldout", "heal", "load_training_text",
           "make_accelerator", "parse_train", "select_parameters", "split_windows", "trainable_names",
           "stderr_log", "lora_targets", "merge_lora"]
