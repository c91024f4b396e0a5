"""`depthprune sparsify`: Wanda / STADE / magnitude on a model spec or a pruned directory."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserError


def calib_batches(lm, args):
    """Calibration inputs from ``--calib`` (``--calib-samples`` windows of ``--seq-len`` tokens)."""
    from .adapters import calibration
    if lm.family != "causal_lm":
        raise UserError(f"text calibration needs a causal LM; {lm.spec} is a {lm.family} model")
    return calibration(lm, args.calib, args.calib_samples, args.seq_len, args.batch_size)


def cmd_sparsify(args) -> int:
    from .depth.plan import check_new_dir, open_model, write_dir
    from .sparsity.sparsify import explain, nonzero, sparsify
    if not args.explain:
        if not args.out:
            raise UserError("--out is required (or pass --explain)")
        check_new_dir(args.out, args.force)
        if (args.sparsity is None) == (args.pattern is None):
            raise UserError("give exactly one of --sparsity or --pattern")
        if args.sparsity is not None and not 0 <= args.sparsity < 1:
            raise UserError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    lm, plan = open_model(args.model, args.trust_checkpoint)
    if args.explain:
        for r in explain(lm.model, lm.example_inputs, lm.forward_fn):
            what = r["skip"] or ("centred -> wanda metric" if r["centred"] else "not centred -> std metric + bias")
            print(f"{r['layer']:<45} {what:<34} (nearest producer: {', '.join(r['producers']) or 'model input'})")
        return 0
    batches = calib_batches(lm, args) if args.method != "magnitude" else None
    before = nonzero(lm.model)
    t0 = time.perf_counter()
    result = sparsify(lm.model, args.method, lm.example_inputs, lm.forward_fn, batches,
                      sparsity=args.sparsity, pattern=args.pattern)
    seconds = time.perf_counter() - t0
    after = nonzero(lm.model)
    prior = []
    if (Path(args.model) / "sparsity.json").is_file():
        prior = json.loads((Path(args.model) / "sparsity.json").read_text()).get("added_bias", [])
    added = sorted(set(prior) | set(result["added_bias"]))
    report = {"model": args.model, "method": args.method,
              **({"sparsity": args.sparsity} if args.sparsity is not None else {"pattern": args.pattern}),
              "nonzero_before": before, "nonzero_after": after, "seconds": seconds,
              "calib": args.calib if batches else None, "calib_samples": args.calib_samples if batches else 0,
              "seq_len": args.seq_len if batches else 0, "calibration": result["mode"],
              "bias_params_added": sum(lm.model.get_submodule(p).out_features for p in result["added_bias"]),
              "layers": list(result["layers"].values())}
    write_dir(args.out, {"plan.json": plan, "sparsity.json": {"method": args.method, "added_bias": added},
                         "report.json": report}, lm.model, force=args.force, lm=lm)
    print(f"{args.method}: non-zero parameters {before:,d} -> {after:,d} "
          f"({100 * (1 - after / before):.2f} % fewer) in {seconds:.1f} s; wrote {args.out}")
    return 0


def add_calib_args(p, samples: int = 64) -> None:
    p.add_argument("--calib", default="shakespeare:calib",
                   help="calibration text: shakespeare:calib (default), shakespeare:PLAY or a file")
    p.add_argument("--calib-samples", type=int, default=samples,
                   help=f"calibration windows (images for YOLO; default {samples})")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")


def add_commands(sub, model_arg) -> None:
    s = sub.add_parser("sparsify", help="intra-layer pruning (magnitude, Wanda, STADE) of surviving layers")
    model_arg(s, "model spec or a directory written by `prune`/`sparsify`")
    from .sparsity import METHODS
    s.add_argument("--method", choices=METHODS, default="stade")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--sparsity", type=float, help="unstructured: fraction of each row's weights to zero")
    which.add_argument("--pattern", help="N:M semi-structured, e.g. 2:4 or 4:8")
    add_calib_args(s)
    s.add_argument("--out", help="output directory (model.safetensors, plan.json, sparsity.json, report.json)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--explain", action="store_true",
                   help="print each layer's centred/not-centred choice and metric, then exit")
    s.set_defaults(func=cmd_sparsify)
