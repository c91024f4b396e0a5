"""`depthprune finetune`: recovery training of a (pruned) detector with ultralytics' trainer."""
from __future__ import annotations

import os
import tempfile
import time

from .cli_args import placement, add_model_args, check_model_input, int_at_least, print_json, progress, trusts_checkpoint
from .errors import UserError


def check_finetune_args(args) -> None:
    """What can be checked before loading: the model spec or output directory, the dataset, ``--out``."""
    from pathlib import Path

    from .io.model_dir import SPARSITY, is_model_dir
    from .io.outdir import check_out
    check_model_input(args)
    if is_model_dir(args.model) and (Path(args.model) / SPARSITY).is_file():
        raise UserError(f"{args.model} is sparsified: training would fill its zeros again; fine-tune the "
                        "pruned model first, then sparsify")
    if not os.path.isfile(args.data):
        raise UserError(f"no such dataset YAML: {args.data}")
    if not 0 < args.lr0 < 1:
        raise UserError(f"--lr0 must be in (0, 1), got {args.lr0}")
    check_out(args.out, args.force, [args.model])


def cmd_finetune(args) -> int:
    check_finetune_args(args)
    from .io.model_dir import is_model_dir, open_model, structure_files
    from .io.outdir import OutputDir, fault_hold
    from .io.report import command_report, read_report
    lm, plan = open_model(args.model, trusts_checkpoint(args), args.trust_code, progress(args), placement(args))
    if lm.family != "yolo":
        raise UserError(f"fine-tuning runs ultralytics' detection trainer; {args.model} is a {lm.family} model, "
                        "not a detector")
    import dataclasses

    from .adapters.yolo_train import finetune_detector
    from .depth import count_params
    from .eval.detect import validate_detector
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
        previous = read_report(args.model) if is_model_dir(args.model) else None
        files = {"plan.json": plan, "report.json": command_report("finetune", report, previous),
                 **structure_files(args.model)}  # training changes no structure
        od.write(files, lm=lm)
        from .viz.report_html import write_report
        write_report(od.tmp, shown=od.path)  # part of the output: written before the commit
        od.commit()
    if args.json:
        print_json(report)
    else:
        what = ""
        if before and after:
            what = f"; val mAP50-95 {before['mAP50-95']:.4f} -> {after['mAP50-95']:.4f}"
        print(f"fine-tuned {args.epochs} epoch(s) in {info['seconds']:.0f} s{what}; wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    f = sub.add_parser("finetune", help="recovery training of a (pruned) detector with ultralytics' trainer")
    add_model_args(f, "detector spec or a directory written by `prune`")
    f.add_argument("--data", required=True, help="ultralytics dataset YAML (trains on `train`, validates on `val`)")
    f.add_argument("--epochs", type=int_at_least(1), default=5, help="epochs (default 5)")
    f.add_argument("--lr0", type=float, default=5e-4, help="AdamW learning rate, no warm-up (default 5e-4)")
    f.add_argument("--batch", type=int_at_least(1), default=16, help="images per batch (default 16)")
    f.add_argument("--workers", type=int_at_least(0), default=2, help="data loader workers (default 2)")
    f.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    f.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip validating before and after (mAP on the dataset's val split)")
    f.add_argument("--out", required=True, help="output directory (like `prune`'s; report.json gains `finetune`)")
    f.add_argument("--force", action="store_true", help="replace --out if it is a previous depthprune output")
    f.add_argument("--json", action="store_true", help="print the report as one JSON object")
    f.set_defaults(func=cmd_finetune)
