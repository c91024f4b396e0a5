"""The export command of the CLI: ``depthprune export DIR --format FORMAT --out OUT``."""
from __future__ import annotations

FORMAT_HELP = {
    "hf": "plain Hugging Face checkpoint (plans that remove whole decoder blocks only)",
    "nemotron-nas": "DeciLM block_configs (vLLM, SGLang, TensorRT-LLM, MLX-LM, llama.cpp): removed attention / "
                    "MLP sublayers, per-block MLP widths",
    "onnx": "ONNX through ultralytics' exporter (YOLO models)",
    "depthprune": "every pruned state, with its own modeling code (transformers, trust_remote_code=True)",
}


def cmd_export(args) -> int:
    from .args import placement
    from ..io.plan_file import is_model_dir, read_plan
    where = placement(args)
    if is_model_dir(args.dir):
        read_plan(args.dir)  # a damaged plan is refused in a fraction of a second, before torch loads
    from ..export import check_export_out, export
    check_export_out(args.out, [args.dir])  # before loading anything
    result = export(args.dir, args.format, args.out, trust_checkpoint=args.trust_checkpoint or args.trust_code,
                    placement=where)
    for note in result.notes:
        print(note)
    extra = f" (+{result.extra_params:,d} of zero padding)" if result.extra_params else ""
    print(f"exported {args.dir} as {result.fmt}: {result.params:,d} parameters{extra}; wrote {result.out} "
          f"({', '.join(result.files)})")
    return 0


def add_commands(sub) -> None:
    """Register ``export`` (its input is a pruned-model directory)."""
    e = sub.add_parser("export", help="export a pruned model directory to another format",
                       description="Export a pruned-model directory. Formats: "
                                   + "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items()))
    e.add_argument("dir", help="a pruned-model directory (written by `depthprune prune`)")
    e.add_argument("--format", required=True, metavar="FORMAT", help="one of: " + ", ".join(FORMAT_HELP))
    e.add_argument("--out", required=True, help="directory to create (must not exist; never overwritten)")
    e.add_argument("--trust-checkpoint", action="store_true",
                   help="allow the directory's base model to be a pickled checkpoint (.pt) you trust")
    e.add_argument("--trust-code", action="store_true",
                   help="allow a directory whose base runs code (a python: spec, a .pt, a model YAML that names "
                        "code); implies --trust-checkpoint")
    from .args import add_placement_args
    add_placement_args(e)
    e.set_defaults(func=cmd_export)
