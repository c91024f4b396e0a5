"""`depthprune finetune`: recovery training of a (pruned) detector with ultralytics' trainer, or
of a (pruned) language model by knowledge distillation from its dense base (`depthprune.heal`)."""
from __future__ import annotations

import math
import os
import tempfile
import time

from .args import finish_output, placement, add_model_args, check_model_input, int_at_least, print_json, progress, trusts_checkpoint
from ..errors import UserError


def check_finetune_args(args) -> None:
    """What can be checked before loading: the model spec or output directory, the dataset, ``--out``."""
    from pathlib import Path

    from ..io.model_dir import SPARSITY, is_model_dir
    from ..io.outdir import check_out
    check_model_input(args)
    if is_model_dir(args.model) and (Path(args.model) / SPARSITY).is_file():
        raise UserError(f"{args.model} is sparsified: training would fill its zeros again; fine-tune the "
                        "pruned model first, then sparsify")
    lm_flags = given_lm_flags(args)
    if args.data is not None and lm_flags:
        raise UserError(f"--data is for detectors, {lm_flags[0]} for language models: give one or the other")
    if args.data is None:  # the language-model path (a detector without --data is refused once loaded)
        detector = given_detector_flags(args)
        if detector:
            raise UserError(f"{detector[0]} is a detector flag and needs --data (language models take --text)")
        check_lm_args(args)
        return
    if not os.path.isfile(args.data):
        raise UserError(f"no such dataset YAML: {args.data}")
    if not 0 < args.lr0 < 1:
        raise UserError(f"--lr0 must be in (0, 1), got {args.lr0}")
    check_out(args.out, args.force, [args.model])


#: flags of the language-model path (None in the parser when not given, so that a flag given to
#: a detector is seen; `LM_DEFAULTS` fills them in) and the detector path's flags with their defaults
#: (one that differs from its default, given to a language model, is refused)
LM_FLAGS = {"text": "--text", "steps": "--steps", "tokens": "--tokens", "loss": "--loss", "train": "--train",
            "lr": "--lr", "lr_schedule": "--lr-schedule", "warmup": "--warmup", "seq_len": "--seq-len",
            "batch_size": "--batch-size", "grad_accum": "--grad-accum",
            "temperature": "--temperature", "eval_every": "--eval-every", "patience": "--patience",
            "checkpoint_dir": "--checkpoint-dir", "save_every": "--save-every"}
DETECTOR_DEFAULTS = {"epochs": 5, "lr0": 5e-4, "batch": 16, "workers": 2}
DETECTOR_FLAGS = {"epochs": "--epochs", "lr0": "--lr0", "batch": "--batch", "workers": "--workers"}
LM_DEFAULTS = {"text": "shakespeare:calib", "steps": None, "tokens": None, "loss": "kd", "train": "all", "lr": 1e-4,
               "lr_schedule": "constant", "warmup": 0,
               "seq_len": 256, "batch_size": 8, "grad_accum": 1, "temperature": 1.0, "eval_every": 0,
               "patience": 0, "checkpoint_dir": None, "save_every": 0}


def given_lm_flags(args) -> list[str]:
    return [flag for key, flag in LM_FLAGS.items() if getattr(args, key, None) is not None]


def given_detector_flags(args) -> list[str]:
    flags = [flag for key, flag in DETECTOR_FLAGS.items() if getattr(args, key, None) != DETECTOR_DEFAULTS[key]]
    return flags + ([] if getattr(args, "validate", True) else ["--no-validate"])


def budget_steps(args) -> int:
    """Optimizer steps of the budget: ``--steps``, or ``--tokens`` over the tokens of one step."""
    return args.steps if args.steps is not None else math.ceil(args.tokens / (args.batch_size * args.seq_len))


def check_lm_args(args) -> None:
    """The language-model flags, checked before loading (defaults filled in)."""
    from ..heal.distill import parse_train
    from ..io.outdir import check_out
    if args.steps is not None and args.tokens is not None:
        raise UserError("give --steps or --tokens, not both")
    for key, default in LM_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, default)
    if args.steps is None and args.tokens is None:
        args.steps = 100
    parse_train(args.train)
    if not 0 < args.lr < 1:
        raise UserError(f"--lr must be in (0, 1), got {args.lr}")
    if not 0 < args.temperature <= 100:
        raise UserError(f"--temperature must be in (0, 100], got {args.temperature}")
    budget = budget_steps(args)
    if args.warmup >= budget:
        raise UserError(f"--warmup {args.warmup} must be fewer steps than the budget ({budget})")
    if args.batch_size % args.grad_accum:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum}")
    if args.text and os.path.isdir(args.text):
        pass  # each file is checked when read
    else:
        from ..adapters.text import check_text_spec
        check_text_spec(args.text, "--text")
    if args.checkpoint_dir is not None and os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
        raise UserError(f"--checkpoint-dir {args.checkpoint_dir} exists and is not a directory")
    check_out(args.out, args.force, [args.model, args.text] + ([args.checkpoint_dir] if args.checkpoint_dir else []))


def cmd_finetune(args) -> int:
    check_finetune_args(args)
    if args.data is None:
        return cmd_finetune_lm(args)
    from ..io.model_dir import open_model
    from ..io.outdir import OutputDir, fault_hold
    lm, plan = open_model(args.model, trusts_checkpoint(args), args.trust_code, progress(args), placement(args))
    if lm.labelled_batches is None:
        raise UserError(f"--data is for detectors (ultralytics' trainer); {args.model} is a {lm.family} model, "
                        "not a detector: language models take --text (distillation from the dense base)")
    import dataclasses

    from ..adapters.yolo_train import finetune_detector
    from ..depth import count_params
    from ..eval.detect import validate_detector
    imgsz = int(lm.example_inputs[0].shape[-1])
    t0 = time.perf_counter()
    before = validate_detector(lm.model, args.data, imgsz) if args.validate else None
    with OutputDir(args.out, force=args.force, protect=[args.model, args.data], command="finetune") as od:
        fault_hold("start")
        with tempfile.TemporaryDirectory(prefix="depthprune-finetune-") as work:
            model, info = finetune_detector(lm.model, args.data, imgsz, args.epochs, work, batch=args.batch,
                                            workers=args.workers, seed=args.seed, lr0=args.lr0)
        after = validate_detector(model, args.data, imgsz) if args.validate else None
        lm = dataclasses.replace(lm, model=model)
        report = {"model": args.model, "data": os.path.abspath(args.data), "epochs": args.epochs,
                  "lr0": args.lr0, "optimizer": info["optimizer"], "batch": args.batch, "imgsz": imgsz, "seed": args.seed,
                  "params": count_params(model), "train_seconds": info["seconds"],
                  "map_before": before, "map_after": after, "seconds": time.perf_counter() - t0}
        _finish(od, args.model, plan, report, lm)
    if args.json:
        print_json(report)
    else:
        what = ""
        if before and after:
            what = f"; val mAP50-95 {before['mAP50-95']:.4f} -> {after['mAP50-95']:.4f}"
        print(f"fine-tuned {args.epochs} epoch(s) in {info['seconds']:.0f} s{what}; wrote {args.out}")
    return 0


def cmd_finetune_lm(args) -> int:
    """The language-model path: distillation from the plan's dense base (`depthprune.heal`)."""
    import dataclasses

    from ..adapters.load import load_model
    from ..adapters.tokens import tokenizer_of
    from ..depth import count_params
    from ..heal.distill import HealConfig, heal, load_training_text, make_accelerator, split_windows, stderr_log
    from ..io.model_dir import is_model_dir, open_model
    from ..io.outdir import OutputDir, fault_hold
    from ..placement import Placement
    t0 = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    where = placement(args)
    if world > 1:  # every process loads on the CPU; accelerate puts each copy on its own device
        if where.device not in ("auto", "cpu") and not where.device == "cuda":
            raise UserError(f"--device {where.device}: under a launcher each process takes its own device; "
                            "give --device auto, cuda or cpu")
        use_cpu = where.device == "cpu" or not _has_cuda()
        where = Placement("cpu", where.dtype)
    lm, plan = open_model(args.model, trusts_checkpoint(args), args.trust_code, progress(args), where)
    if lm.labelled_batches is not None:
        raise UserError(f"{args.model} is a detector: fine-tuning it needs --data (an ultralytics dataset YAML); "
                        "--text and the distillation flags are for language models")
    if lm.adapter.data != "text" or lm.logits_fn is None:
        raise UserError(f"fine-tuning of {lm.family} models is not supported yet: {args.model} is neither a causal "
                        "language model nor a detector")
    if getattr(lm.model, "hf_device_map", None) and len(set(lm.model.hf_device_map.values())) > 1:
        raise UserError("fine-tuning a model spread over several devices is not supported yet; give --device cpu "
                        "or one GPU (cuda:N), or run data-parallel with torchrun")
    teacher, teacher_spec = None, None
    if args.loss != "ce":
        if not is_model_dir(args.model):
            raise UserError(f"--loss {args.loss} distils from the dense base an output directory's plan names; "
                            f"{args.model} is a model spec (prune it first, or give --loss ce)")
        teacher_spec = plan["base"]
        teacher = load_model(teacher_spec, trust_checkpoint=trusts_checkpoint(args), progress=progress(args),
                             trust_code=args.trust_code, placement=where).model
    if world == 1:
        from ..placement import input_device
        use_cpu = input_device(lm.model).type == "cpu"
    accelerator = make_accelerator(cpu=use_cpu, device_placement=world > 1)
    text = load_training_text(args.text, "--text")
    ids = tokenizer_of(lm)(text, return_tensors="pt").input_ids[0]
    ctx = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if ctx and args.seq_len > ctx:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's context ({ctx} tokens)")
    train, heldout = split_windows(ids, args.seq_len)
    steps = budget_steps(args)
    cfg = HealConfig(loss=args.loss, train=args.train, steps=steps, lr=args.lr, lr_schedule=args.lr_schedule,
                     warmup=args.warmup, batch_size=args.batch_size,
                     grad_accum=args.grad_accum, temperature=args.temperature, eval_every=args.eval_every,
                     patience=args.patience, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                     save_every=args.save_every, stop_after=_test_stop_after())
    extra = {"model": os.path.abspath(args.model) if is_model_dir(args.model) else args.model, "text": args.text,
             "teacher": teacher_spec}
    log = stderr_log if progress(args) else None

    def train_and_report():
        model, info = heal(lm.model, teacher, train, heldout, cfg, accelerator=accelerator, log=log,
                           fingerprint_extra=extra)
        report = {"model": args.model, "teacher": teacher_spec, "text": args.text, "budget":
                  {"steps": steps, "tokens": args.tokens}, "seed": args.seed, "params": count_params(model),
                  **info, "seconds": time.perf_counter() - t0}
        report["heldout_ppl_before"] = info["heldout_before"]["ppl"]
        report["heldout_ppl_after"] = info["heldout_after"]["ppl"]
        return model, report

    if not accelerator.is_main_process:  # the other processes train; the first one writes
        train_and_report()
        return 0
    with OutputDir(args.out, force=args.force, protect=[args.model, args.text] +
                   ([args.checkpoint_dir] if args.checkpoint_dir else []), command="finetune") as od:
        fault_hold("start")
        model, report = train_and_report()
        lm = dataclasses.replace(lm, model=model)
        _finish(od, args.model, plan, report, lm)
    if args.json:
        print_json(report)
    else:
        b, a = report["heldout_before"], report["heldout_after"]
        kl = f", KL to the teacher {b['kl']:.4f} -> {a['kl']:.4f}" if b.get("kl") is not None else ""
        print(f"fine-tuned {report['steps_done']} step(s) ({report['tokens']:,} tokens) in "
              f"{report['train_seconds']:.0f} s; held-out perplexity {b['ppl']:.3f} -> {a['ppl']:.3f}{kl}; "
              f"wrote {args.out}")
    return 0


def _finish(od, model_arg: str, plan: dict, report: dict, lm) -> None:
    """Write the fine-tuned model: the input's plan and structure (training changes no
    structure) and its report with the ``finetune`` section added."""
    from ..io.model_dir import is_model_dir, structure_files
    from ..io.report import command_report, read_report
    previous = read_report(model_arg) if is_model_dir(model_arg) else None
    files = {"plan.json": plan, "report.json": command_report("finetune", report, previous),
             **structure_files(model_arg)}
    finish_output(od, files, lm)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _test_stop_after() -> int | None:
    """Test hook: ``DEPTHPRUNE_TEST_HEAL_STOP=K`` interrupts training after step K's checkpoint."""
    v = os.environ.get("DEPTHPRUNE_TEST_HEAL_STOP", "")
    return int(v) if v.isdigit() else None


def add_commands(sub) -> None:
    f = sub.add_parser("finetune", help="recovery training of a (pruned) detector with ultralytics' trainer, or of a "
                                        "(pruned) language model by distillation from its dense base")
    add_model_args(f, "detector or language model spec, or a directory written by `prune`")
    d = f.add_argument_group("detectors (ultralytics' trainer)")
    d.add_argument("--data", help="ultralytics dataset YAML (trains on `train`, validates on `val`); detectors only")
    d.add_argument("--epochs", type=int_at_least(1), default=5, help="epochs (default 5)")
    d.add_argument("--lr0", type=float, default=5e-4, help="AdamW learning rate, no warm-up (default 5e-4)")
    d.add_argument("--batch", type=int_at_least(1), default=16, help="images per batch (default 16)")
    d.add_argument("--workers", type=int_at_least(0), default=2, help="data loader workers (default 2)")
    t = f.add_argument_group("language models (knowledge distillation from the plan's dense base; runs "
                             "data-parallel under torchrun / accelerate launch)")
    t.add_argument("--text", help="training text: shakespeare:calib (default), shakespeare:PLAY, pydoc:reference, a "
                                  "UTF-8 text file or a directory of them; its last tenth is held out for evaluation")
    t.add_argument("--steps", type=int_at_least(1), help="optimizer steps (default 100)")
    t.add_argument("--tokens", type=int_at_least(1), help="budget in training tokens instead of --steps")
    t.add_argument("--loss", choices=("kd", "ce", "kd+ce"),
                   help="kd: KL to the teacher on temperature-softened logits (default); ce: next-token "
                        "cross-entropy; kd+ce: both")
    t.add_argument("--train", metavar="WHAT", help="all (default), lora:R (LoRA of rank R, merged into the weights "
                                                   "before saving) or last:N (the last N surviving blocks, final "
                                                   "norm and LM head)")
    t.add_argument("--lr", type=float, help="AdamW (peak) learning rate (default 1e-4)")
    t.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"),
                   help="after the warm-up: constant (default), or decaying linearly / along a cosine to 0 at the "
                        "last step")
    t.add_argument("--warmup", type=int_at_least(0), help="steps of linear warm-up from 0 (default 0)")
    t.add_argument("--seq-len", type=int_at_least(2), help="tokens per window (default 256)")
    t.add_argument("--batch-size", type=int_at_least(1), help="windows per optimizer step, over every process "
                                                              "(default 8)")
    t.add_argument("--grad-accum", type=int_at_least(1), help="micro-batches per step (default 1)")
    t.add_argument("--temperature", type=float, help="distillation temperature (default 1)")
    t.add_argument("--eval-every", type=int_at_least(1), help="steps between held-out evaluations (default: a "
                                                              "tenth of the budget)")
    t.add_argument("--patience", type=int_at_least(1), help="stop after this many evaluations without held-out "
                                                            "improvement, keeping the best evaluation's weights "
                                                            "(default: never)")
    t.add_argument("--checkpoint-dir", metavar="DIR", help="save the training state here (every --save-every "
                                                           "steps); run the same command again to resume")
    t.add_argument("--save-every", type=int_at_least(1), help="steps between checkpoints (default: every "
                                                              "evaluation)")
    f.add_argument("--seed", type=int, default=0, help="training seed (default 0): data order, LoRA initialisation")
    d.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip validating before and after (mAP on the dataset's val split)")
    f.add_argument("--out", required=True, help="output directory (like `prune`'s; report.json gains `finetune`)")
    f.add_argument("--force", action="store_true", help="replace --out if it is a previous depthprune output")
    f.add_argument("--json", action="store_true", help="print the report as one JSON object")
    f.set_defaults(func=cmd_finetune)
