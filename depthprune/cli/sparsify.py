"""`depthprune sparsify`: Wanda / STADE / magnitude on a model spec or a pruned directory."""
from __future__ import annotations

import time

from .args import finish_output, placement, METHODS, add_calib_args, add_model_args, check_model_input, fraction, nm_pattern, print_json, \
    progress, trusts_checkpoint
from ..errors import UserError


def calib_batches(lm, args):
    """Calibration inputs from ``--calib`` (``--calib-samples`` windows of ``--seq-len`` tokens)."""
    from ..adapters.load import calibration
    if lm.adapter.data != "text":
        raise UserError(f"text calibration needs a causal LM; {lm.spec} is a {lm.family} model")
    return calibration(lm, args.calib, args.calib_samples, args.seq_len, args.batch_size)


def check_sparsify_args(args) -> None:
    """What can be checked before loading: flags, the model spec or output directory (its plan,
    whether it runs code, its weights file), the calibration text, ``--out``."""
    from ..adapters.text import check_text_spec
    from ..io.outdir import check_out
    if not args.explain:
        if not args.out:
            raise UserError("--out is required (or pass --explain)")
        if (args.sparsity is None) == (args.pattern is None):
            raise UserError("give exactly one of --sparsity or --pattern")
    check_model_input(args)
    if not args.explain:
        if args.method != "magnitude":
            check_text_spec(args.calib)
        check_out(args.out, args.force, [args.model])


def cmd_sparsify(args) -> int:
    check_sparsify_args(args)
    if args.explain:
        return _explain(args)
    from ..io.outdir import OutputDir, fault_hold
    with OutputDir(args.out, force=args.force, protect=[args.model], command="sparsify") as od:
        fault_hold("start")
        files, lm, report = _sparsify(args)
        finish_output(od, files, lm)
    if args.json:
        print_json(report)
    else:
        before, after = report["nonzero_before"], report["nonzero_after"]
        print(f"{args.method}: non-zero parameters {before:,d} -> {after:,d} "
              f"({100 * (1 - after / before):.2f} % fewer) in {report['seconds']:.1f} s; wrote {args.out}")
    return 0


def _explain(args) -> int:
    from ..io.model_dir import open_model
    from ..sparsity.sparsify import explain
    lm, _ = open_model(args.model, trusts_checkpoint(args), args.trust_code, progress(args), placement(args))
    for r in explain(lm.model, lm.example_inputs, lm.forward_fn):
        what = r["skip"] or ("centred -> wanda metric" if r["centred"] else "not centred -> std metric + bias")
        print(f"{r['layer']:<45} {what:<34} (nearest producer: {', '.join(r['producers']) or 'model input'})")
    return 0


def _sparsify(args) -> tuple[dict, object, dict]:
    """Load and sparsify; returns (files to write, LoadedModel, report)."""
    from pathlib import Path

    from ..io.model_dir import SPARSITY, is_model_dir, open_model, read_added_bias, structure_files
    from ..io.report import command_report, read_report
    from ..sparsity.sparsify import nonzero, sparsify
    lm, plan = open_model(args.model, trusts_checkpoint(args), args.trust_code, progress(args), placement(args))
    batches = calib_batches(lm, args) if args.method != "magnitude" else None
    before = nonzero(lm.model)
    t0 = time.perf_counter()
    result = sparsify(lm.model, args.method, lm.example_inputs, lm.forward_fn, batches,
                      sparsity=args.sparsity, pattern=args.pattern, progress=progress(args))
    seconds = time.perf_counter() - t0
    after = nonzero(lm.model)
    prior, previous = [], None
    if is_model_dir(args.model):
        prior = read_added_bias(Path(args.model))
        previous = read_report(args.model)
    added = sorted(set(prior) | set(result["added_bias"]))
    report = {"model": args.model, "method": args.method,
              **({"sparsity": args.sparsity} if args.sparsity is not None else {"pattern": args.pattern}),
              "nonzero_before": before, "nonzero_after": after, "seconds": seconds,
              "calib": args.calib if batches else None, "calib_samples": args.calib_samples if batches else 0,
              "seq_len": args.seq_len if batches else 0, "calibration": result["mode"],
              "bias_params_added": sum(lm.model.get_submodule(p).out_features for p in result["added_bias"]),
              "layers": list(result["layers"].values())}
    files = {"plan.json": plan, SPARSITY: {"method": args.method, "added_bias": added},
             "report.json": command_report("sparsify", report, previous), **structure_files(args.model)}
    return files, lm, report


def add_commands(sub) -> None:
    s = sub.add_parser("sparsify", help="intra-layer pruning (magnitude, Wanda, STADE) of surviving layers")
    add_model_args(s, "model spec or a directory written by `prune`/`sparsify`")
    s.add_argument("--method", choices=METHODS, default="stade")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--sparsity", type=fraction, help="unstructured: fraction of each row's weights to zero, "
                                                         "in [0, 1)")
    which.add_argument("--pattern", type=nm_pattern, help="N:M semi-structured, e.g. 2:4 or 4:8")
    add_calib_args(s)
    s.add_argument("--out", help="output directory (model.safetensors, plan.json, sparsity.json, report.json)")
    s.add_argument("--force", action="store_true", help="replace --out if it is a previous depthprune output")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.add_argument("--explain", action="store_true",
                   help="print each layer's centred/not-centred choice and metric, then exit")
    s.set_defaults(func=cmd_sparsify)
