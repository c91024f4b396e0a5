"""Trade-off curves from several ``report.json`` files: quality and measured latency against
parameter reduction, one series per label (e.g. fine vs sublayer vs block).

Report keys read (dotted paths; the first present wins, so a new key is one edit here):

- reduction: ``reduction`` (fraction of parameters removed, 0..1, as `depthprune prune`
  writes it), else ``1 - params_after / params_before``.
- quality, lower is better: ``perplexity`` from ``eval.perplexity``, ``eval.ppl``,
  ``perplexity_after``; higher is better: ``mAP50-95`` from ``eval.map50_95``,
  ``eval.mAP50-95``; ``mAP50`` from ``eval.map50``, ``eval.mAP50``. The first metric any
  report holds is plotted; reports without it are left out of that panel.
- latency (ms): ``eval.latency_ms``, ``eval.speed.latency_ms``, ``eval.speed.prefill_ms``,
  ``eval.prefill_ms``.

A value is a number, or an object holding it under ``value`` (``median``, ``mean``), so
``{"value": 23.4, "command": "depthprune eval ..."}`` works. ``eval.points`` (a list of objects
with ``reduction`` and the metric keys above without the ``eval.`` prefix) gives several points
from one report (e.g. intermediate targets); ``eval.dense`` (same keys) adds the dense model at
reduction 0 to that report's series.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.outdir import write_output_file
from ..integrity import read_json_file
from . import style as S

QUALITY_KEYS: dict[str, tuple[list[str], bool]] = {  # name -> (paths, higher is better)
    "perplexity": (["eval.perplexity", "eval.ppl", "perplexity_after"], False),
    "mAP50-95": (["eval.map50_95", "eval.mAP50-95", "eval.map.mAP50-95"], True),
    "mAP50": (["eval.map50", "eval.mAP50", "eval.map.mAP50"], True),
}
LATENCY_KEYS = ["eval.latency_ms", "eval.speed.latency_ms", "eval.speed.prefill_ms", "eval.prefill_ms"]
LABEL_KEYS = ["label", "granularity"]
VALUE_KEYS = ("value", "median", "mean")


@dataclass(frozen=True)
class Point:
    reduction: float  # fraction of parameters removed
    quality: dict  # metric name -> value
    latency_ms: float | None
    source: str = ""


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        for k in VALUE_KEYS:
            if isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool):
                return float(v[k])
    return None


def _first(obj: Any, paths: list[str]) -> float | None:
    for p in paths:
        v = _number(_get(obj, p))
        if v is not None:
            return v
    return None


def _reduction(report: dict) -> float | None:
    r = _number(report.get("reduction"))
    if r is not None:
        return r
    before, after = _number(report.get("params_before")), _number(report.get("params_after"))
    return 1 - after / before if before and after is not None else None


def _point(obj: dict, reduction: float | None, source: str, prefix: bool = True) -> Point | None:
    strip = (lambda ps: ps) if prefix else (lambda ps: [p.split(".", 1)[1] if p.startswith("eval.") else p for p in ps])
    if reduction is None:
        return None
    quality = {name: v for name, (paths, _) in QUALITY_KEYS.items() if (v := _first(obj, strip(paths))) is not None}
    return Point(reduction, quality, _first(obj, strip(LATENCY_KEYS)), source)


def report_points(report: dict, source: str = "") -> list[Point]:
    """Every point a report gives (itself, ``eval.points``, ``eval.dense``)."""
    out = []
    p = _point(report, _reduction(report), source)
    if p is not None and (p.quality or p.latency_ms is not None):
        out.append(p)
    ev = report.get("eval") if isinstance(report.get("eval"), dict) else {}
    for q in ev.get("points") or []:
        if isinstance(q, dict):
            p = _point(q, _reduction(q), source, prefix=False)
            if p is not None and (p.quality or p.latency_ms is not None):
                out.append(p)
    if isinstance(ev.get("dense"), dict):
        p = _point(ev["dense"], 0.0, source + " (dense)", prefix=False)
        if p is not None and (p.quality or p.latency_ms is not None):
            out.append(p)
    return out


def read_report(path: str | os.PathLike) -> dict:
    """A ``report.json`` (or a directory holding one); `UserError` when unreadable."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.exists() and not p.is_symlink():
        raise UserError(f"no such report: {p}")
    data = read_json_file(p, "report")
    if not isinstance(data, dict):
        raise UserError(f"{p} is not a report object")
    return data


def parse_specs(text: str | list[str]) -> list[tuple[str | None, str]]:
    """``"[LABEL=]PATH,[LABEL=]PATH"`` (or a list of such items) -> ``[(label or None, path)]``."""
    items = text if isinstance(text, list) else [text]
    out = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            label, _, path = part.rpartition("=")
            out.append((label or None, path))
    if not out:
        raise UserError("--curves needs at least one report.json (or an output directory)")
    return out


def curve_points(specs: list[tuple[str | None, str]] | list[tuple[str | None, dict]]) -> dict[str, list[Point]]:
    """Series ``label -> points`` sorted by reduction. Each spec is ``(label, path or report)``;
    a missing label is the report's ``label``/``granularity``, else its directory name."""
    series: dict[str, list[Point]] = {}
    for label, src in specs:
        report = src if isinstance(src, dict) else read_report(src)
        name = str(src) if not isinstance(src, dict) else (label or "report")
        if label is None:
            label = next((str(report[k]) for k in LABEL_KEYS if report.get(k)), None)
        if label is None:
            p = Path(name)
            label = (p if p.is_dir() else p.parent).name or name
        series.setdefault(label, []).extend(report_points(report, name))
    for label in series:
        series[label].sort(key=lambda p: p.reduction)
    return series


def quality_metric(series: dict[str, list[Point]]) -> str | None:
    """The quality metric plotted: the first of `QUALITY_KEYS` any point holds."""
    return next((name for name in QUALITY_KEYS if any(name in p.quality for ps in series.values() for p in ps)), None)


def plot_curves(series: dict[str, list[Point]], out: str | os.PathLike, title: str = "") -> dict:
    """Plot ``series`` to ``out`` (.png or .svg): quality and latency against parameter
    reduction (%), one line per label. Returns what was plotted:
    ``{"quality": name or None, "panels": [...], "series": {label: [[x%, quality, latency], ...]}}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = S.picture_path(out, "curves are")
    metric = quality_metric(series)
    has_latency = any(p.latency_ms is not None for ps in series.values() for p in ps)
    panels = ([metric] if metric else []) + (["latency"] if has_latency else [])
    if not panels:
        raise UserError("the reports hold no quality (perplexity, mAP) or latency figures to plot; "
                        "run `depthprune eval` on them first")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=150, squeeze=False)
    markers = "osD^v<>pX*"
    plotted: dict[str, list] = {}
    for k, (label, pts) in enumerate(series.items()):
        plotted[label] = [[100 * p.reduction, p.quality.get(metric) if metric else None, p.latency_ms] for p in pts]
        for ax, panel in zip(axes[0], panels):
            xy = [(100 * p.reduction, p.quality.get(panel) if panel != "latency" else p.latency_ms) for p in pts]
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:
                xs, ys = zip(*xy)
                ax.plot(xs, ys, marker=markers[k % len(markers)], ms=5, lw=1.6, label=label)
    for ax, panel in zip(axes[0], panels):
        ax.set_xlabel("parameter reduction (%)", fontsize=9)
        if panel == "latency":
            ax.set_ylabel("latency (ms)", fontsize=9)
            ax.set_title("measured latency", fontsize=10)
        else:
            better = "higher" if QUALITY_KEYS[panel][1] else "lower"
            ax.set_ylabel(f"{panel} ({better} is better)", fontsize=9)
            ax.set_title(panel, fontsize=10)
            ys = [p.quality[panel] for ps in series.values() for p in ps if panel in p.quality]
            if panel == "perplexity" and ys and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        write_output_file(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=150,
                                                       facecolor="white"), force=True)
    finally:
        plt.close(fig)
    return {"quality": metric, "panels": panels, "series": plotted}


def training_points(report: dict) -> dict[str, list[tuple[float, float]]]:
    """``report["finetune"]["curve"]`` (language-model healing) as ``{series: [(step, value)]}``:
    the training loss per step and the held-out KL to the teacher (else perplexity) at each
    evaluation; ``{}`` when there is no curve."""
    ft = report.get("finetune")
    curve = ft.get("curve") if isinstance(ft, dict) else None
    if not isinstance(curve, list):
        return {}
    pts = [p for p in curve if isinstance(p, dict) and isinstance(p.get("step"), (int, float))]
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    held = "heldout_kl" if any(num(p.get("heldout_kl")) for p in pts) else "heldout_ppl"
    out = {"training loss": [(p["step"], p["loss"]) for p in pts if num(p.get("loss"))],
           "held-out " + ("KL to the teacher" if held == "heldout_kl" else "perplexity"):
               [(p["step"], p[held]) for p in pts if num(p.get(held))]}
    return {k: v for k, v in out.items() if len(v) >= 2}


def plot_training(series: dict[str, list[tuple[float, float]]], out: str | os.PathLike) -> None:
    """The training loss (left axis) and the held-out measure (right axis) against the optimizer
    step, one figure (.png or .svg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=150)
    axes = [ax, ax.twinx()] if len(series) > 1 else [ax]
    for a, (label, xy), colour in zip(axes, series.items(), ("#1f77b4", "#d62728")):
        a.plot([s for s, _ in xy], [v for _, v in xy], color=colour, label=label, marker="." if len(xy) < 40 else None)
        a.set_ylabel(label, color=colour, fontsize=9)
        a.tick_params(labelsize=8)
    ax.set_xlabel("optimizer step", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        write_output_file(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), facecolor="white"),
                          force=True)
    finally:
        plt.close(fig)
