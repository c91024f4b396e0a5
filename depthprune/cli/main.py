"""The parser and the commands that need no module of their own (graph, demo); `main` maps
errors to one line and an exit code."""
from __future__ import annotations

import os
import sys

from .args import OneLineParser, add_model_args, add_quiet, placement, print_json, progress, traced, trusts_checkpoint
from ..errors import UserError, one_line


def cmd_graph(args) -> int:
    from ..adapters import check_spec
    from ..io.outdir import check_out, write_output_file
    where = placement(args)
    check_spec(args.model, trusts_checkpoint(args), args.trust_code)
    if args.out:
        check_out(args.out, args.force, [args.model], "file")
    from ..adapters.load import load_model
    from ..graph import CompGraph
    lm = load_model(args.model, trust_checkpoint=trusts_checkpoint(args), progress=progress(args),
                    trust_code=args.trust_code, placement=where)
    graph = traced(lm, lambda: CompGraph(lm.model, lm.example_inputs, lm.forward_fn))
    if args.out:
        def write(tmp: str) -> None:
            if args.out.endswith(".json"):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(graph.to_json())
            else:
                graph.to_graphml(tmp)
        write_output_file(args.out, write, args.force, [args.model])
    summary = graph.summary()
    if args.json:
        print_json(summary)
    else:
        print(f"{args.model}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    """The main job on the packaged defaults (see README)."""
    from . import demo
    return demo.run(args)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="depthprune", description="Structural depth pruning of pretrained PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("graph", help="build and export the computation graph")
    add_model_args(g)
    g.add_argument("--out", help="write GraphML (or JSON if the name ends in .json)")
    g.add_argument("--json", action="store_true", help="print the node counts as one JSON object")
    g.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    g.set_defaults(func=cmd_graph)

    d = sub.add_parser("demo", help="run the main job on the packaged SmolLM2-135M and text")
    d.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    d.add_argument("--force", action="store_true", help="replace --out if it is a previous depthprune output")
    add_quiet(d)
    d.set_defaults(func=cmd_demo)

    from . import data, evaluate, export, finetune, profile, prune, sparsify, viz
    prune.add_commands(sub)
    profile.add_commands(sub)
    sparsify.add_commands(sub)
    finetune.add_commands(sub)
    evaluate.add_commands(sub)
    viz.add_commands(sub)
    export.add_commands(sub)
    data.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path the locale cannot decode still prints as given
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape" if stream is sys.stdout else "backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    from ..io.outdir import Terminated, write_failure
    try:
        return args.func(args)
    except UserError as e:
        print(f"depthprune: error: {one_line(e, None, name=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted; no partial output left", file=sys.stderr)
        return 130
    except Terminated as e:
        print("depthprune: terminated; no partial output left", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # stdout closed early (`depthprune candidates ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the file system refused a write outside an output's own checks
        reason = write_failure(e)
        if reason is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"depthprune: error: {where}{reason}", file=sys.stderr)
        return 2

