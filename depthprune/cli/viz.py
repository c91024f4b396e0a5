"""`depthprune viz`: drawings, pruning maps, trade-off curves and report.html."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError


def _check_new_file(path: str, args, flag: str) -> None:
    """An output file of `viz`: new, or replaced under --force, never a file of the model read."""
    from ..io.outdir import check_out
    check_out(path, args.force, [args.target] if args.target else [], "file", flag)


def graph_of(target: str, trust_checkpoint: bool = False, trust_code: bool = False):
    """Graph data (a DiGraph from `depthprune.viz.load_graph`) of an output directory or a model
    spec. A directory's ``graph.json`` is read as data; without one the pruned model is loaded
    and the graph taken from the replayed session."""
    from ..io.model_dir import is_model_dir
    from ..viz import GRAPH_FILE, apply_plan, graph_json, load_graph
    d = Path(target)
    if d.is_dir() and (d / GRAPH_FILE).is_file():
        g = load_graph(d / GRAPH_FILE)
        plan_file = d / "plan.json"
        if plan_file.is_file() and all(s == "live" for _, s in g.nodes(data="state")):
            from ..io.model_dir import read_plan
            plan = read_plan(d)
            if plan.get("steps"):
                g = apply_plan(g, plan)
        return g
    if d.is_dir() and is_model_dir(d):
        from ..io.model_dir import load_pruned
        _, pruner = load_pruned(d, trust_code)
        return load_graph(graph_json(pruner))
    if d.is_dir() and not (d / "config.json").is_file():
        raise UserError(f"{d} is neither a depthprune output directory (plan.json) nor a model directory")
    from ..adapters.load import load_model
    from ..graph import CompGraph
    lm = load_model(target, trust_checkpoint=trust_checkpoint or trust_code, trust_code=trust_code)
    return load_graph(graph_json(CompGraph(lm.model, lm.example_inputs, lm.forward_fn)))


def cmd_viz(args) -> int:
    if not any((args.out, args.map, args.curves, args.report)):
        raise UserError("nothing to draw: give --out FILE, --map FILE, --curves REPORTS or --report")
    if args.target is None and (args.out or args.map or args.report):
        raise UserError("--out, --map and --report need a DIR_OR_SPEC")
    from ..viz.draw import FORMATS, builtin_note, parse_range, render, select
    if args.out:
        if Path(args.out).suffix.lower() not in FORMATS:
            raise UserError(f"--out must end in one of {', '.join(FORMATS)}, got {args.out!r}")
        _check_new_file(args.out, args, "--out")
    if args.map:
        if Path(args.map).suffix.lower() not in (".png", ".svg"):
            raise UserError(f"--map must end in .png or .svg, got {args.map!r}")
        _check_new_file(args.map, args, "--map")
    if args.curves:
        if Path(args.curves_out).suffix.lower() not in (".png", ".svg"):
            raise UserError(f"--curves-out must end in .png or .svg, got {args.curves_out!r}")
        _check_new_file(args.curves_out, args, "--curves-out")
    if args.report and (args.target is None or not Path(args.target).is_dir()):
        raise UserError("--report needs an output directory (written by `depthprune prune` or `sparsify`)")
    if args.report:  # checked before any drawing: the page is rewritten in place
        from ..integrity import read_json_object
        from ..io.outdir import check_out
        check_out(Path(args.target) / "report.html", True, (), "file", "report.html")
        for name, what in (("report.json", "report"), ("plan.json", "plan"), ("sparsity.json", "sparsity record")):
            read_json_object(Path(args.target) / name, what)
    series = None
    if args.curves:  # read the reports before any long work
        from ..viz.curves import curve_points, parse_specs
        series = curve_points(parse_specs(args.curves))
    g = graph_of(args.target, args.trust_checkpoint, args.trust_code) if (args.out or args.map or args.report) else None
    if args.out:
        blocks = None
        if args.blocks is not None:
            blocks = parse_range(args.blocks, len(g.graph.get("blocks") or []))
        view = select(g, block=args.block, blocks=blocks, expand=args.expand)
        where = (f"block {args.block}" if args.block is not None else f"blocks {args.blocks}" if args.blocks
                 else "whole model")
        used = render(view, args.out, title=f"{args.target}: {where}", engine=args.engine)
        if used == "builtin":
            print(f"depthprune: note: {builtin_note()}", file=sys.stderr)
        print(f"wrote {args.out} ({view.number_of_nodes()} nodes, {view.number_of_edges()} edges"
              + (f", drawn by {used}" if used != "data" else "") + ")")
    if args.map:
        from ..viz.pruning_map import build_map, plot_map
        groups = None
        if Path(args.target).is_dir() and (Path(args.target) / "report.json").is_file():
            from ..viz.curves import read_report
            units = read_report(args.target).get("units")
            groups = units if isinstance(units, list) else None
        m = build_map(g, groups)
        plot_map(m, args.map, title=f"{args.target}: pruning map")
        print(f"wrote {args.map} ({m.layout}, {len(m.rows)} x {len(m.cols)} cells: "
              + ", ".join(f"{v} {k}" for k, v in sorted(m.counts.items())) + ")")
    if args.curves:
        from ..viz.curves import plot_curves
        info = plot_curves(series, args.curves_out)
        print(f"wrote {args.curves_out} ({', '.join(info['panels'])}; series {', '.join(series)})")
    if args.report:
        from ..viz import GRAPH_FILE
        from ..viz.curves import parse_specs
        from ..viz.graphdata import graph_dict
        from ..viz.report_html import write_report
        extra = None if (Path(args.target) / GRAPH_FILE).is_file() else graph_dict(g)
        out = write_report(args.target, curves=parse_specs(args.curves) if args.curves else None, graph=extra,
                           engine=args.engine)
        print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    """Register `depthprune viz` (``model_arg`` is accepted for symmetry with the other command
    modules; viz takes its model as a positional DIR_OR_SPEC)."""
    v = sub.add_parser("viz", help="draw the computation graph, the pruning map, trade-off curves, report.html")
    v.add_argument("target", nargs="?", metavar="DIR_OR_SPEC",
                   help="an output directory of prune/sparsify (reads its graph.json) or a model spec")
    which = v.add_mutually_exclusive_group()
    which.add_argument("--block", type=int, help="draw only block N (0-based; negative counts from the end)")
    which.add_argument("--blocks", metavar="A:B", help="draw blocks A..B-1 (a Python slice: 2:5, :3, -2:)")
    v.add_argument("--expand", action="store_true",
                   help="whole model: draw every node instead of one box per repeated block")
    v.add_argument("--out", help="graph drawing: .svg, .png (Graphviz, else built-in layout), .graphml, .json, .dot")
    v.add_argument("--map", metavar="FILE", help="pruning map (thesis Fig. 4.3): .png or .svg")
    v.add_argument("--curves", action="append", metavar="[LABEL=]R.json,...",
                   help="reports (report.json or output directories) to plot against parameter reduction; "
                        "repeatable; reports with the same label form one series")
    v.add_argument("--curves-out", default="curves.png", help="where --curves goes (.png/.svg, default curves.png)")
    v.add_argument("--report", action="store_true", help="(re)write DIR/report.html")
    v.add_argument("--engine", choices=("auto", "dot", "builtin"), default="auto",
                   help="graph layout: Graphviz dot when installed (auto), or the built-in layered layout")
    v.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a pickled checkpoint (.pt) you trust")
    v.add_argument("--trust-code", action="store_true",
                   help="allow code that comes with the model (a python: base, a Hugging Face auto_map, a model "
                        "YAML that names code); implies --trust-checkpoint")
    v.add_argument("--force", action="store_true", help="overwrite output files that exist")
    v.set_defaults(func=cmd_viz)
