"""Pruning commands of the CLI: candidates, prune."""
from __future__ import annotations

import argparse
import sys
import time

from .args import (BUDGETS, CHANNELS, EFFORTS, GRANULARITIES, SCHEDULES, SCORES, add_calib_args, add_model_args,
                   count_or_all, finish_output, fraction, int_at_least, placement, print_json, progress, traced,
                   trusts_checkpoint)
from ..errors import UserError


def _session(args):
    from ..adapters.load import load_model
    from ..depth import DepthPruner
    from ..depth.plan import fingerprint
    lm = load_model(args.model, trust_checkpoint=trusts_checkpoint(args), progress=progress(args),
                    trust_code=args.trust_code, placement=placement(args))
    fp = fingerprint(lm.model)
    pruner = traced(lm, lambda: DepthPruner(lm.model, lm.example_inputs, lm.forward_fn, recipe=lm.recipe,
                                            on_change=lm.on_change))
    return lm, pruner, fp


def cmd_candidates(args) -> int:
    from ..adapters import check_spec
    placement(args)
    check_spec(args.model, trusts_checkpoint(args), args.trust_code)
    _, pruner, _ = _session(args)
    cands = pruner.candidates()
    yes = [c for c in cands if c.candidate]
    changing = [c for c in yes if c.in_width != c.out_width and c.kind == "transform"]
    transforms = [c for c in cands if c.kind == "transform"]
    summary = {"units": len(cands), "candidates": len(yes), "transforms": len(transforms),
               "transform_candidates": sum(c.kind == "transform" for c in yes),
               "width_changing_candidates": len(changing),
               "search_space_extension": round(len(changing) / max(1, len(yes) - len(changing)), 4)}
    if args.json:
        print_json({"summary": summary, "units": [c.as_dict() for c in cands]})
        return 0
    for c in cands:
        mark = "yes" if c.candidate else "no "
        extra = f"{c.params_removed:>10,d} params" if c.candidate else c.reason
        width = f"{c.in_width}->{c.out_width}" if c.in_width else ""
        print(f"{mark} {c.kind:<9} {c.unit:<50} {width:>11}  {extra}")
    print_json(summary)
    return 0


def prune_config(args):
    """The `depthprune.importance.PruneConfig` of the prune flags (None: the flag left out)."""
    from ..importance.config import PruneConfig
    return PruneConfig(target=args.target, score=args.score, schedule=args.schedule, granularity=args.granularity,
                       rescore_top=args.rescore_top, effort=args.effort, compensate=args.compensate,
                       compensated_top=args.rescore_compensated, compensated_windows=args.rescore_windows,
                       screen=args.rescore_outsiders, cross_fit=args.cross_fit, channels=args.channels, seed=args.seed,
                       budget=args.budget, defer_nested=args.defer_nested)


def check_prune_args(args) -> list[str] | None:
    """Everything about a prune that can be checked before loading the model: the flags, the
    model spec, the calibration text, the dataset, ``--out``. Returns the ``--units`` list."""
    from ..adapters import check_spec
    from ..adapters.text import check_text_spec
    from ..io.outdir import check_out
    if (args.units is None) == (args.target is None):
        raise UserError("give either --units (explicit) or --target (scored, scheduled)")
    units = None
    if args.units is not None:
        units = [u.strip() for u in args.units.split(",") if u.strip()]
        if not units:
            raise UserError("--units needs at least one unit name (see `depthprune candidates`)")
        if len(set(units)) != len(units):
            raise UserError("--units names a unit twice")
        if args.rescore_compensated or args.rescore_windows or args.cross_fit or args.rescore_outsiders or \
                args.defer_nested:
            raise UserError("--rescore-compensated/--rescore-windows/--rescore-outsiders/--cross-fit rank the groups "
                            "of --target; --units are applied as given")
        if args.effort is not None:
            raise UserError("--effort chooses how --target selects; --units are applied as given")
        if args.budget != "params":
            raise UserError("--budget says what --target counts; --units are applied as given")
    if args.latency_table is not None:
        if args.budget != "latency":
            raise UserError("--latency-table is the table --budget latency counts with; add --budget latency")
        from .profile import read_table
        read_table(args.latency_table)  # there and readable before the model loads
    placement(args)
    check_spec(args.model, trusts_checkpoint(args), args.trust_code)
    if args.target is not None:
        prune_config(args).check()  # the selection flags fit together (the model's defaults come once it is loaded)
        if args.data is not None:
            import os
            if not os.path.isfile(args.data):
                raise UserError(f"no such dataset YAML: {args.data}")
        else:
            check_text_spec(args.calib)
    check_out(args.out, args.force, [args.model])
    return units


def cmd_prune(args) -> int:
    from ..io.outdir import OutputDir, fault_hold
    from ..io.report import command_report
    units = check_prune_args(args)
    with OutputDir(args.out, force=args.force, protect=[args.model], command="prune") as od:
        fault_hold("start")
        report, pruner, fp, lm = _prune(args, units, lambda reduction: fault_hold("step"))
        from ..io.model_dir import pruned_files
        finish_output(od, pruned_files(pruner, args.model, fp, {"report.json": command_report("prune", report)}), lm)
    if args.json:
        print_json(report)
    else:
        spent, extra = report.get("costs", {}).get(report.get("budget"), {}), ""
        if report.get("budget", "params") != "params" and None not in (spent.get("before"), spent.get("after")):
            shown = (lambda s: f"{1000 * s:.2f} ms") if report["budget"] == "latency" else (lambda v: f"{v:,.0f}")
            extra = (f"; {report['budget']} {shown(spent['before'])} -> {shown(spent['after'])} "
                     f"({100 * report['budget_reduction']:.2f} % fewer)")
        print(f"pruned {len(report['units'])} unit(s): {report['params_before']:,d} -> {report['params_after']:,d} "
              f"parameters ({100 * report['reduction']:.2f} % fewer){extra}; wrote {args.out}")
    return 0


def _prune(args, units, on_step) -> tuple[dict, object, str, object]:
    """Load, prune by ``units`` or to ``--target``; returns (report, DepthPruner, base fingerprint,
    LoadedModel)."""
    from ..depth import count_params
    from ..progress import progress_bar
    lm, pruner, fp = _session(args)
    config = prune_config(args).resolved(lm)  # what the library chooses for this model; report.json says it
    before = count_params(pruner.model)
    report = {"model": args.model, "params_before": before}
    t0 = time.perf_counter()
    compensator = None
    if units is not None:
        from ..offload import refuse_offloaded
        refuse_offloaded(lm.model)
        if config.compensate:
            from ..adapters.load import calibration
            from ..compensate import Compensator
            compensator = Compensator(lm.model, calibration(lm, args.calib, args.calib_samples, args.seq_len,
                                                            args.batch_size), lm.forward_fn,
                                      logits_fn=lm.logits_fn, nll_fn=lm.nll_fn)
        applied = []
        for u in progress_bar(units, desc="pruning", unit="unit", enabled=progress(args) and len(units) > 1):
            try:
                step = pruner.prune(u)
            except UserError as e:
                raise UserError(f"{e} (`depthprune candidates --model {args.model}` lists the units)") from None
            applied.append({"unit": u, "kind": step.kind, "params_removed": step.params_removed})
            if compensator is not None:
                from ..importance.scores import changed_paths
                rec = compensator.compensate(changed_paths([step]))
                if rec is not None and rec.get("writer") and rec.get("alpha") is not None:
                    step.ops.append({"op": "refit", "module": rec["writer"], "block": rec["block"],
                                     "alpha": rec["alpha"], "tokens": rec["tokens"]})
            on_step(None)
        report["units"] = applied
        if compensator is not None:
            report.update(compensate=True, compensation=compensator.log, calib=args.calib,
                          calib_samples=args.calib_samples, seq_len=args.seq_len)
    else:
        from ..adapters.load import calibration
        from ..importance import collapsed, costs, prune_to_target
        if args.data is not None:
            if lm.labelled_batches is None:
                raise UserError(f"--data (a labelled detection dataset) needs a detector; {args.model} is not one")
            import dataclasses
            batches = lm.labelled_batches(lm, args.data, args.calib_samples, args.batch_size)
            lm = dataclasses.replace(lm, loss_fn=lm.labelled_loss_fn)
            calib = args.data
        else:
            batches = calibration(lm, args.calib, args.calib_samples, args.seq_len, args.batch_size)
            calib = args.calib if lm.logits_fn is not None else "sample inputs"
        table = None
        if config.budget == "latency":
            from ..importance.budget import one_sample
            from .profile import latency_table
            table = latency_table(lm, args, one_sample(batches[0]))
            report["latency_table"] = {k: v for k, v in table.to_json().items() if k != "modules"}
        before_costs = costs(lm, batches, latency_table=table)
        _, outcome = prune_to_target(lm, config, batches, pruner=pruner, progress=progress(args), on_step=on_step,
                                     latency_table=table)
        after_costs = costs(lm, batches, latency_table=table)
        report.update(budget=config.budget,
                      costs={k: {"before": v, "after": after_costs[k]} for k, v in before_costs.items()},
                      budget_reduction=(outcome.cost_before - outcome.cost_after) / outcome.cost_before)
        report.update(target=config.target, reached=outcome.reached, score=config.score, schedule=config.schedule,
                      effort=config.effort,
                      granularity=config.granularity, channels=config.channels, rescore_top=config.rescore_top,
                      rescore_compensated=config.compensated_top, rescore_windows=config.compensated_windows,
                      rescore_outsiders=config.screen, cross_fit=config.cross_fit, defer_nested=config.defer_nested,
                      calib=calib,
                      calib_samples=args.calib_samples, seq_len=args.seq_len,
                      scoring_seconds=outcome.scoring_seconds, channel_seconds=outcome.channel_seconds,
                      pruning_seconds=outcome.pruning_seconds,
                      compensate=config.compensate, compensation=outcome.compensation,
                      compensation_seconds=outcome.compensation_seconds,
                      calib_ppl_before=outcome.calib_ppl_before, calib_ppl_after=outcome.calib_ppl_after,
                      collapsed=collapsed(outcome),
                      units=outcome.applied)
        if not outcome.reached:
            print(f"depthprune: warning: no more prunable units; reached {report['budget_reduction']:.2%} "
                  f"of the {config.target:.2%} target ({config.budget})", file=sys.stderr)
        if collapsed(outcome):
            print(f"depthprune: warning: the calibration perplexity rose from {outcome.calib_ppl_before:.2f} to "
                  f"{outcome.calib_ppl_after:.2f}: the pruned model has likely collapsed; use more calibration "
                  "data (--calib-samples), --compensate, or a lower --target", file=sys.stderr)
    after = count_params(pruner.model)
    report.update(params_after=after, reduction=(before - after) / before, seconds=time.perf_counter() - t0)
    return report, pruner, fp, lm


def add_commands(sub) -> None:
    c = sub.add_parser("candidates", help="list prunable units, what each removes, or why not")
    add_model_args(c)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_candidates)

    p = sub.add_parser("prune", help="depth-prune units and save the pruned model")
    add_model_args(p)
    p.add_argument("--units", help="comma-separated unit names, applied in order")
    p.add_argument("--budget", choices=BUDGETS, default="params",
                   help="what --target counts: params (default), flops (per token at --seq-len for language models, "
                        "per input otherwise), kv-cache (bytes per token), latency (seconds per forward of one "
                        "calibration window, estimated from a per-module table measured on this device: "
                        "`depthprune profile`)")
    p.add_argument("--latency-table", metavar="FILE",
                   help="with --budget latency: the table `depthprune profile --out FILE` wrote (e.g. on the device "
                        "the model will run on); default: the cached table of this model, device and input shape, "
                        "else measured now")
    p.add_argument("--target", type=fraction, help="reduction of the --budget (parameters) to reach, in [0, 1), "
                                                   "e.g. 0.2 (scored and scheduled)")
    p.add_argument("--score", choices=SCORES,
                   help="importance score (default: the model recipe's, see docs/importance.md; else angular, or output "
                        "for models without repeated blocks)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="which unit next (default: the recipe's; else paper = Algorithm 8)")
    p.add_argument("--granularity", choices=GRANULARITIES,
                   help="fine units, attention/MLP sublayers, whole blocks, or all of them (default: the "
                        "recipe's; else fine)")
    p.add_argument("--effort", choices=EFFORTS,
                   help="how much selecting the units may cost (language models; docs/importance.md): fast = "
                        "compensated whole blocks ranked once (ShortGPT + compensation, ~30 dense forwards); "
                        "balanced (default) = the mixed pool re-ranked by compensated scores; best = balanced "
                        "and every other group screened too (about twice balanced's cost)")
    p.add_argument("--channels", choices=CHANNELS, default="taylor",
                   help="how width reconciliation picks channels (default taylor)")
    p.add_argument("--rescore-top", type=int_at_least(0), metavar="K",
                   help="re-scoring schedules: re-score lazily, at most K groups per step, best stale score "
                        "first (default: the recipe's; else 0 = re-score every group)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compensate", action="store_true", default=None,
                      help="training-free compensation: after every pruned group, refit the layer that writes the "
                           "changed block's output by least squares on the calibration set (no parameters added); "
                           "default: on for --target on language models")
    comp.add_argument("--no-compensate", dest="compensate", action="store_false",
                      help="no compensation (the default for --units and for models without next-token logits)")
    # expert flags behind --effort, left out of --help (docs/importance.md, "Expert flags"): re-rank the
    # best M groups of each step by their compensated score ('all': every score); add Gromov's runs of
    # 2..W whole blocks; let every other group compete by its cross-fitted compensated score; score
    # each calibration sample of a trial with the refit made without its fold
    p.add_argument("--rescore-compensated", type=count_or_all, metavar="M", help=argparse.SUPPRESS)
    p.add_argument("--rescore-windows", type=int_at_least(0), metavar="W", help=argparse.SUPPRESS)
    p.add_argument("--rescore-outsiders", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cross-fit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--defer-nested", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed of --score random")
    add_calib_args(p, samples=32)
    p.add_argument("--data", help="ultralytics dataset YAML: Taylor uses the detection training loss on its "
                                  "labelled images (default: a label-free fallback on the packaged images)")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, plan.json, report.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it is a previous depthprune output")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_prune)
