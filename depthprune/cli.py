"""The `depthprune` command: a thin layer over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


def _model(args):
    from .adapters import load_model
    return load_model(args.model, trust_checkpoint=getattr(args, "trust_checkpoint", False))


def cmd_graph(args) -> int:
    from .graph import CompGraph
    lm = _model(args)
    graph = CompGraph(lm.model, lm.example_inputs, lm.forward_fn)
    if args.out:
        _check_new_file(args.out, args.force)
        tmp = args.out + ".tmp"
        if args.out.endswith(".json"):
            with open(tmp, "w") as f:
                f.write(graph.to_json())
        else:
            graph.to_graphml(tmp)
        os.replace(tmp, args.out)
    summary = graph.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.model}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    """The main job on the packaged defaults (see README)."""
    from . import demo
    return demo.run(args)


def cmd_synth_detect(args) -> int:
    from .data import make_synth_detect
    data_yaml = make_synth_detect(args.out, seed=args.seed, train=args.train, val=args.val, imgsz=args.imgsz,
                                  classes=args.classes, force=args.force)
    print(f"wrote {args.train} train and {args.val} val images; dataset YAML {data_yaml}")
    return 0


def _check_new_file(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"directory {parent} does not exist")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="depthprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp, help="model spec (smollm2-135m, yolov5n.yaml, HF dir, ...)"):
        sp.add_argument("--model", required=True, help=help)
        sp.add_argument("--trust-checkpoint", action="store_true",
                        help="allow loading a pickled checkpoint (.pt) you trust")

    g = sub.add_parser("graph", help="build and export the computation graph")
    model_arg(g)
    g.add_argument("--out", help="write GraphML (or JSON if the name ends in .json)")
    g.add_argument("--json", action="store_true", help="print the node counts as one JSON object")
    g.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    g.set_defaults(func=cmd_graph)

    d = sub.add_parser("demo", help="run the main job on the packaged SmolLM2-135M and text")
    d.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    d.add_argument("--force", action="store_true", help="replace --out if it exists")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="make datasets (no download)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sd = data_sub.add_parser("synth-detect", help="a synthetic shapes detection dataset in ultralytics format")
    sd.add_argument("--out", required=True, help="output directory (images/, labels/, data.yaml)")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--train", type=int, default=600, help="train images (default 600)")
    sd.add_argument("--val", type=int, default=150, help="val images (default 150)")
    sd.add_argument("--imgsz", type=int, default=320, help="image side in pixels (default 320)")
    sd.add_argument("--classes", type=int, default=4, help="shape classes, 1 to 6 (default 4)")
    sd.add_argument("--force", action="store_true", help="replace --out if it is a dataset made here")
    sd.set_defaults(func=cmd_synth_detect)

    from . import cli_prune, cli_sparsify
    cli_prune.add_commands(sub, model_arg)
    cli_sparsify.add_commands(sub, model_arg)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"depthprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
