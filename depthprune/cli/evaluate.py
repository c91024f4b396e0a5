"""`depthprune eval`: quality, size and speed of a model spec or a pruned output directory."""
from __future__ import annotations

import json
from pathlib import Path

from .args import add_placement_args
from ..errors import UserError


def cmd_eval(args) -> int:
    from ..adapters.text import check_text_spec
    from .args import check_model_input, placement
    from ..io.plan_file import is_model_dir
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    where = placement(args)
    check_model_input(args)  # a mistyped path or hub id fails here, in seconds, before torch loads
    check_text_spec(args.text, "--text")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    in_place = is_model_dir(args.model)
    if in_place:  # the directory's report is rewritten afterwards: a damaged one fails now, not then
        from ..integrity import read_json_object
        from ..io.outdir import check_out
        check_out(Path(args.model) / "report.html", True, (), "file", "report.html")
        for name, what in (("report.json", "report"), ("plan.json", "plan"), ("sparsity.json", "sparsity record"),
                           ("graph.json", "graph")):
            read_json_object(Path(args.model) / name, what)
    from ..eval.evaluate import evaluate
    from ..eval.speed import SpeedSettings
    result = evaluate(args.model, text=args.text, speed=args.speed, data=args.data, tasks=tasks, placement=where,
                      task_dir=args.task_dir, limit=args.limit, trust_code=args.trust_code,
                      speed_settings=SpeedSettings(repeats=args.repeats))
    if in_place:
        from ..io.report import update_report
        from ..viz.report_html import write_report
        update_report(args.model, "eval", result)
        write_report(Path(args.model))
    if args.json:
        print(json.dumps(result))
        return 0
    for line in _summary(result):
        print(line)
    if in_place:
        print(f"wrote the eval section of {Path(args.model) / 'report.json'}")
    return 0


def _summary(r: dict) -> list[str]:
    lines = []
    if "params" in r:
        extra = f" ({100 * r['reduction']:.2f} % fewer than the dense {r['dense_params']:,d})" if "reduction" in r else ""
        lines.append(f"parameters: {r['params']:,d}{extra}")
    if "perplexity" in r:
        p = r["perplexity"]
        dense = f" (dense {p['dense']:.2f})" if "dense" in p else ""
        lines.append(f"perplexity on {p['text']}: {p['value']:.2f}{dense}  "
                     f"[{p['max_windows']} windows of {p['window']} tokens, stride {p['stride']}]")
    if "speed" in r:
        s = r["speed"]
        for k in [k for k in s["pruned"] if k not in ("weights_bytes", "peak_rss_bytes")]:
            dense = f", dense {s['dense'][k]:.4g}, speed-up {s['speedup'][k]:.2f}x" if "dense" in s else ""
            lines.append(f"{k}: {s['pruned'][k]:.4g}{dense}")
        lines.append(f"(median of {s['repeats']} interleaved runs after {s['warmup']} warm-up, {s['threads']} threads)")
        mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        lines.append(f"weights {mb(s['pruned']['weights_bytes'])}, peak process memory "
                     f"{mb(s['pruned']['peak_rss_bytes'])}" +
                     (f" (dense {mb(s['dense']['weights_bytes'])}, {mb(s['dense']['peak_rss_bytes'])})"
                      if "dense" in s else ""))
    if "gflops" in r:
        lines.append(f"GFLOPs at {r['imgsz']} px: {r['gflops']:.3f}" +
                     (f" (dense {r['dense_gflops']:.3f})" if "dense_gflops" in r else ""))
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"latency at {lat['imgsz']} px: {1000 * lat['pruned_s']:.1f} ms" +
                     (f" (dense {1000 * lat['dense_s']:.1f} ms, speed-up {lat['speedup']:.2f}x)" if "dense_s" in lat else ""))
    if "map" in r:
        lines.append(f"mAP50 {r['map']['mAP50']:.4f}, mAP50-95 {r['map']['mAP50-95']:.4f} on {r['map']['data']}")
    for task, metrics in (r.get("tasks") or {}).items():
        lines.append(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return lines


def add_commands(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model spec or a pruned output directory (against its dense base)")
    e.add_argument("model", metavar="DIR_OR_SPEC", help="model spec or a directory written by prune/sparsify")
    e.add_argument("--text", default="shakespeare:eval",
                   help="held-out text for perplexity (default shakespeare:eval = Hamlet; pydoc:reference = "
                        "the Python reference, text of another kind)")
    e.add_argument("--speed", action="store_true",
                   help="also time prefill (batch 1 x 256, 8 x 128 tokens) and KV-cache decoding (LMs), or "
                        "latency at 640 px (detectors), the dense base measured in the same run")
    e.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    e.add_argument("--data", help="ultralytics dataset YAML: mAP50 / mAP50-95 with ultralytics' validator")
    e.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks")
    e.add_argument("--task-dir", help="directory of local lm-eval task YAMLs (no dataset hub needed)")
    e.add_argument("--limit", type=int, help="at most this many documents per task")
    e.add_argument("--trust-code", action="store_true",
                   help="allow code that comes with the model (a python: base, a .pt, a Hugging Face auto_map, a "
                        "model YAML that names code)")
    add_placement_args(e)
    e.add_argument("--json", action="store_true", help="print the results as one JSON object")
    e.set_defaults(func=cmd_eval)
