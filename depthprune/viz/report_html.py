"""``report.html``: one self-contained page per output directory.

Reads the directory's ``report.json``, ``plan.json``, ``graph.json`` and ``sparsity.json``
(each optional) and writes the summary, the pruning map, the graph drawings, the table of pruned
units, the evaluation figures and the trade-off curves. Images are inlined as ``data:`` URIs and
the style sheet is inline: no external URL, no script, so the file opens anywhere offline.
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..integrity import read_json_object
from ..io.outdir import write_output_file
from .curves import LABEL_KEYS, curve_points, plot_curves, plot_training, training_points
from .draw import builtin_note, render, select
from .graphdata import GRAPH_FILE, apply_plan, block_index, load_graph, main_blocks, params_after
from .pruning_map import build_map, plot_map

REPORT_FILE = "report.html"
MAX_EVAL_ROWS = 200  # evaluation figures listed in the table (all are in the raw report)

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: #1d1d1f; background: #ffffff; margin: 0; line-height: 1.5; font-size: 15px; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; font-weight: 650; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #e3e3e8; font-weight: 620; }
h3 { font-size: 15px; margin: 20px 0 6px; font-weight: 620; }
p.sub { color: #5f5f66; margin: 0 0 18px; }
p.note { color: #5f5f66; font-size: 13px; margin: 6px 0 0; }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 5px 12px 5px 0; vertical-align: top; border-bottom: 1px solid #ececf0; }
th { font-weight: 600; color: #3a3a40; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; padding-left: 12px; }
table.kv th { width: 210px; }
table.units { width: 100%; }
table.units td.unit { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px;
                      word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0 6px; }
.card { border: 1px solid #e3e3e8; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 640; font-variant-numeric: tabular-nums; }
.card .k { font-size: 12px; color: #5f5f66; text-transform: uppercase; letter-spacing: .04em; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; display: block; }
figure.scroll { max-height: 1100px; overflow: auto; border: 1px solid #ececf0; border-radius: 6px; padding: 6px; }
figure.scroll img { max-width: none; }
figcaption { color: #5f5f66; font-size: 13px; margin-top: 6px; }
pre { background: #f6f6f8; border-radius: 6px; padding: 10px 12px; font-size: 12.5px; overflow: auto;
      white-space: pre-wrap; word-break: break-word; }
details summary { cursor: pointer; color: #3a3a40; }
"""


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,d}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if v is None:
        return "—"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _pct(v: Any) -> str:
    return f"{100 * v:.2f} %" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def _secs(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "—"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _kv(rows: list[tuple[str, str]]) -> str:
    return ('<table class="kv">' + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
            + "</table>")


# ---------------------------------------------------------------------------- sections
def _summary(report: dict, plan: dict | None, sparsity: dict | None) -> str:
    cards = []
    if "reduction" in report:
        cards.append(("parameters removed", _pct(report["reduction"])))
    if "params_before" in report and "params_after" in report:
        cards.append(("parameters", f"{report['params_before']:,d} → {report['params_after']:,d}"))
    costs = report.get("costs") if isinstance(report.get("costs"), dict) else {}
    for name, label, shown, scale in (("flops", "FLOPs", "{:,.0f}", 1),
                                      ("kv-cache", "KV-cache bytes per token", "{:,.0f}", 1),
                                      ("latency", "estimated latency (ms)", "{:,.2f}", 1000)):
        c = costs.get(name)
        numbers = isinstance(c, dict) and all(isinstance(c.get(k), (int, float)) for k in ("before", "after"))
        if numbers and c["before"] > 0:
            cut = (c["before"] - c["after"]) / c["before"]
            mark = " (targeted)" if report.get("budget") == name else ""
            cards.append((label + mark, f"{shown.format(scale * c['before'])} → {shown.format(scale * c['after'])} "
                                        f"({_pct(cut)} fewer)"))
    if report.get("nonzero_before") and report.get("nonzero_after") is not None:
        cards.append(("non-zero parameters", f"{report['nonzero_before']:,d} → {report['nonzero_after']:,d}"))
    if "units" in report and isinstance(report["units"], list):
        cards.append(("pruning steps", str(len(report["units"]))))
    ft = report.get("finetune")
    if isinstance(ft, dict) and isinstance(ft.get("heldout_before"), dict) and \
            isinstance(ft.get("heldout_after"), dict):
        cards.append(("held-out perplexity after healing",
                      f"{_fmt(ft['heldout_before'].get('ppl'))} → {_fmt(ft['heldout_after'].get('ppl'))}"))
    if isinstance(ft, dict) and isinstance(ft.get("map_after"), dict):
        before = ft["map_before"]["mAP50-95"] if isinstance(ft.get("map_before"), dict) else None
        cards.append(("mAP50-95 after fine-tuning", (f"{before:.3f} → " if before is not None else "")
                      + f"{ft['map_after']['mAP50-95']:.3f}"))
    if "seconds" in report:
        cards.append(("time", _secs(report["seconds"])))
    html = '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
        for k, v in cards) + "</div>"
    rows = []
    model = report.get("model") or (plan or {}).get("base")
    if model:
        rows.append(("model", str(model)))
    if plan and plan.get("base") and plan.get("base") != model:
        rows.append(("base model", str(plan["base"])))
    if "target" in report:
        rows.append(("target", _pct(report["target"])))
    if "reached" in report:
        rows.append(("reached", f"{_fmt(report['reached'])} ({_pct(report.get('reduction'))} removed)"))
    for key, name in (("score", "score"), ("schedule", "schedule"), ("granularity", "granularity"),
                      ("channels", "reconciliation channels"), ("rescore_top", "re-score top K"),
                      ("rescore_compensated", "re-rank top M compensated"),
                      ("rescore_windows", "re-rank block runs up to"),
                      ("rescore_outsiders", "outsiders by cross-fitted score"),
                      ("cross_fit", "cross-fitted trials"),
                      ("method", "sparsity method"), ("sparsity", "sparsity"), ("pattern", "N:M pattern")):
        if report.get(key) is not None:
            rows.append((name, _fmt(report[key])))
    if report.get("calib"):
        calib = str(report["calib"])
        if report.get("calib_samples"):
            calib += f"; {report['calib_samples']} samples"
        if report.get("seq_len"):
            calib += f"; seq_len {report['seq_len']}"
        rows.append(("calibration", calib))
    times = [(k, report[k]) for k in ("scoring_seconds", "channel_seconds", "pruning_seconds",
                                      "compensation_seconds", "seconds")
             if isinstance(report.get(k), (int, float))]
    if times:
        names = {"scoring_seconds": "scoring", "channel_seconds": "channel selection", "pruning_seconds": "pruning",
                 "compensation_seconds": "compensation", "seconds": "total"}
        rows.append(("times", ", ".join(f"{names[k]} {_secs(v)}" for k, v in times)))
    if plan and plan.get("folds"):
        rows.append(("BatchNorm folds", str(len(plan["folds"]))))
    if sparsity:
        rows.append(("sparsified with", str(sparsity.get("method", "?"))))
        if sparsity.get("added_bias"):
            rows.append(("biases added (STADE)", str(len(sparsity["added_bias"]))))
    return html + _kv(rows)


def _units_table(report: dict, plan: dict | None) -> str:
    units = report.get("units") if isinstance(report.get("units"), list) else None
    if not units and plan:
        units = [{"unit": s.get("unit"), "kind": s.get("kind"), "params_removed": s.get("params_removed"),
                  "score": s.get("score")} for s in plan.get("steps", [])]
    if not units:
        return "<p>No units were pruned.</p>"
    has = {k: any(isinstance(u, dict) and u.get(k) is not None for u in units)
           for k in ("kind", "block", "score", "params_removed", "reduction")}
    head = ("<tr><th class=num>#</th><th>unit</th>" + ("<th>kind</th>" if has["kind"] else "")
            + ("<th class=num>block</th>" if has["block"] else "")
            + ("<th class=num>score</th>" if has["score"] else "")
            + ("<th class=num>parameters removed</th>" if has["params_removed"] else "")
            + ("<th class=num>reduction after</th>" if has["reduction"] else "") + "</tr>")
    rows = []
    for i, u in enumerate(units, 1):
        if not isinstance(u, dict):
            continue
        name = str(u.get("unit", ""))
        inner = u.get("units") or []
        if len(inner) > 1:
            name += f" ({len(inner)} units)"
        score = u.get("score")
        score = f"{score:.4g}" if isinstance(score, (int, float)) and not isinstance(score, bool) else _fmt(score)
        rows.append(f"<tr><td class=num>{i}</td><td class=unit>{escape(name)}</td>"
                    + (f"<td>{escape(_fmt(u.get('kind')))}</td>" if has["kind"] else "")
                    + (f"<td class=num>{escape(_fmt(u.get('block')))}</td>" if has["block"] else "")
                    + (f"<td class=num>{escape(score)}</td>" if has["score"] else "")
                    + (f"<td class=num>{escape(_fmt(u.get('params_removed')))}</td>" if has["params_removed"] else "")
                    + (f"<td class=num>{escape(_pct(u.get('reduction')))}</td>" if has["reduction"] else "")
                    + "</tr>")
    return f'<table class="units">{head}{"".join(rows)}</table>'


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(key path, value, command)`` rows of a nested eval object; an object with ``value``
    is one row (its ``command`` goes in the third column)."""
    rows = []
    if isinstance(obj, dict) and "value" in obj and not isinstance(obj["value"], (dict, list)):
        rest = {k: v for k, v in obj.items() if k not in ("value", "command")}
        rows.append((prefix, obj["value"], str(obj.get("command", ""))))
        for k, v in rest.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else k)
        return rows
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "command" and isinstance(v, str):
                rows.append((f"{prefix}.command" if prefix else "command", v, ""))
                continue
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for i, x in enumerate(obj):
            rows += _flatten(x, f"{prefix}[{i}]")
        return rows
    return [(prefix, obj, "")]


def _eval_section(report: dict) -> str:
    ev = report.get("eval")
    rows = []
    if isinstance(ev, dict):
        rows = [r for r in _flatten(ev) if not isinstance(r[1], str) or len(r[1]) < 400]
    for k in ("perplexity_before", "perplexity_after", "eval_text"):  # written by the demo
        if k in report:
            rows.append((k, report[k], ""))
    if not rows:
        return ""
    more = len(rows) - MAX_EVAL_ROWS
    rows = rows[:MAX_EVAL_ROWS]
    has_cmd = any(c for _, _, c in rows)
    body = "".join(f"<tr><th>{escape(k)}</th><td class=num>{escape(_fmt(v))}</td>"
                   + (f"<td class=unit>{escape(c)}</td>" if has_cmd else "") + "</tr>" for k, v, c in rows)
    head = "<tr><th>figure</th><th class=num>value</th>" + ("<th>command</th>" if has_cmd else "") + "</tr>"
    tail = f'<p class="note">{more} more figures in the raw report below.</p>' if more > 0 else ""
    return f'<table class="units">{head}{body}</table>{tail}'


def _samples(report: dict) -> str:
    out = []

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(obj, str) and ("sample" in path.lower()):
            out.append((path, obj))
    walk({k: v for k, v in report.items() if k in ("sample", "samples", "eval")}, "")
    return "".join(f"<h3>{escape(k)}</h3><pre>{escape(v)}</pre>" for k, v in out)


def _most_pruned_block(g) -> int | None:
    """The block (of `main_blocks`) with the largest share of its parameters gone."""
    blocks = main_blocks(g)
    best, best_share = None, 0.0
    for i, _ in enumerate(blocks):
        ds = [d for n, d in g.nodes(data=True) if block_index(n, blocks) == i]
        before = sum(int(d.get("params", 0)) for d in ds)
        share = (before - sum(params_after(d) for d in ds)) / before if before else 0.0
        if share > best_share + 1e-12 and any(d.get("state") != "live" for d in ds):
            best, best_share = i, share
    return best


# ---------------------------------------------------------------------------- page
def write_report(out_dir: str | os.PathLike, curves: list[tuple[str | None, str]] | None = None,
                 graph: dict | None = None, engine: str = "auto", shown: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir/report.html`` from the files in ``out_dir`` and return its path.

    A command that writes an output directory calls this on its temporary directory before
    the commit (the report is part of the output; ``shown`` is the path the page names);
    ``viz --report`` and ``eval`` rewrite it in place. Either way the page goes through a new
    temporary file renamed over ``report.html``, never through a fixed name, and a
    ``report.html`` that is a link or not a regular file is refused, not replaced.

    ``curves``: extra ``(label, report path)`` series for the trade-off plot (this directory's
    own report is one of them). ``graph``: a ``graph.json`` object to use when the directory
    has none. ``engine``: graph drawing engine (see `depthprune.viz.draw.render`).
    """

    d = Path(out_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not a directory")
    report = read_json_object(d / "report.json", "report") or {}
    plan = read_json_object(d / "plan.json", "plan")
    sparsity = read_json_object(d / "sparsity.json", "sparsity record")
    gdata = read_json_object(d / GRAPH_FILE, "graph") or graph
    if not report and not plan:
        raise UserError(f"{d} holds neither report.json nor plan.json: not a depthprune output directory")
    name = _text(Path(shown).name if shown is not None else d.name)
    model = _text(str(report.get("model") or (plan or {}).get("base") or name))
    parts: list[str] = []
    parts.append(f"<h1>depthprune report: {escape(model)}</h1>")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    where = _text(os.path.abspath(shown if shown is not None else d))
    parts.append(f'<p class="sub">{escape(where)} · written {stamp}</p>')
    parts.append("<h2>Summary</h2>" + _summary(report, plan, sparsity))
    with tempfile.TemporaryDirectory(prefix="depthprune-report-") as tmp:
        tmp = Path(tmp)
        g = None
        if gdata is not None:
            g = load_graph(gdata)
            if plan and plan.get("steps") and all(dd.get("state", "live") == "live" for _, dd in g.nodes(data=True)):
                g = apply_plan(g, plan)  # a graph saved before pruning: states from the plan
        parts.append("<h2>Pruning map</h2>")
        if g is not None:
            m = build_map(g, report.get("units") if isinstance(report.get("units"), list) else None)
            plot_map(m, tmp / "map.png")
            counts = ", ".join(f"{v} {k}" for k, v in sorted(m.counts.items()))
            what = ("blocks (columns) × parts of a block (rows)" if m.layout == "grid"
                    else "every transform/attention unit along the network")
            order = "schedule step" if m.order_by == "group" else "plan step"
            parts.append(f'<figure><img alt="pruning map" src="{_data_uri(tmp / "map.png", "image/png")}">'
                         f"<figcaption>{escape(what)}; numbers: pruning order ({order}). Cells: "
                         f"{escape(counts)}.</figcaption></figure>")
        else:
            parts.append(f'<p class="note">No {GRAPH_FILE} in this directory: the map and the drawings need it '
                         f"(`depthprune viz {escape(str(d))} --out graph.svg` builds one from the model).</p>")
        if g is not None:
            parts.append("<h2>Computation graph</h2>")
            drawings = [("whole model" + (", repeated blocks collapsed" if main_blocks(g) else ""),
                         select(g), "overview")]
            b = _most_pruned_block(g)
            if b is not None:
                caption = f"block {b} ({g.graph['blocks'][b]}), the most pruned"
                drawings.append((caption, select(g, block=b), f"block{b}"))
            for caption, view, name in drawings:
                used = render(view, tmp / f"{name}.svg", engine=engine)
                note = f" {builtin_note()}." if used == "builtin" else ""
                big = view.number_of_nodes() > 40
                parts.append(f"<h3>{escape(caption)}</h3><figure{' class=scroll' if big else ''}>"
                             f'<img alt="{escape(caption)}" src="{_data_uri(tmp / f"{name}.svg", "image/svg+xml")}">'
                             f"<figcaption>{view.number_of_nodes()} nodes, {view.number_of_edges()} edges."
                             f"{escape(note)}"
                             "</figcaption></figure>")
        parts.append("<h2>Pruned units</h2>" + _units_table(report, plan))
        ev = _eval_section(report)
        own = _text(next((str(report[k]) for k in LABEL_KEYS if report.get(k)), name))
        specs: list = [(own, report)] if report else []
        specs += [(lbl, p) for lbl, p in (curves or [])]
        series = curve_points(specs) if specs else {}
        n_points = sum(len(v) for v in series.values())
        if ev or n_points:
            parts.append("<h2>Evaluation</h2>" + ev)
        if n_points >= 2:
            info = plot_curves(series, tmp / "curves.png")
            parts.append(f'<figure><img alt="trade-off curves" src="{_data_uri(tmp / "curves.png", "image/png")}">'
                         f"<figcaption>{escape(', '.join(info['panels']))} against parameter reduction; "
                         f"series: {escape(', '.join(series))}.</figcaption></figure>")
        training = training_points(report)
        if training:
            plot_training(training, tmp / "training.png")
            parts.append("<h2>Healing</h2>" + f'<figure><img alt="training curve" '
                         f'src="{_data_uri(tmp / "training.png", "image/png")}"><figcaption>'
                         f"{escape(' and '.join(training))} against the optimizer step "
                         "(report.json: finetune.curve).</figcaption></figure>")
        samples = _samples(report)
        if samples:
            parts.append("<h2>Samples</h2>" + samples)
    if report:
        parts.append("<h2>Raw report</h2><details><summary>report.json</summary><pre>"
                     + escape(json.dumps(report, indent=1)) + "</pre></details>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>depthprune: {escape(model)}</title><style>{CSS}</style></head>"
            "<body><main>" + "\n".join(parts) + "</main></body></html>\n")
    out = d / REPORT_FILE
    data = _text(page).encode("utf-8")
    write_output_file(out, lambda tmp: Path(tmp).write_bytes(data), force=True, flag=REPORT_FILE)
    return out


def _text(s: str) -> str:
    """``s`` with bytes a file name could not decode shown as replacement characters, so the
    page is valid UTF-8 whatever the directory is called."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
