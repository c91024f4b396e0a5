"""Golden computation graphs of reference models: ``python -m depthprune.io.goldens [DIR]``.

A test rebuilds each graph and compares it with the file, so a change to graph extraction
fails until the goldens are regenerated with this command (``make goldens``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import networkx as nx

from ..adapters.load import load_model
from ..graph import CompGraph
from .outdir import write_output_file

GOLDEN_SPECS = {
    "random-llama-2.graphml": "random-llama:2",
    "smollm2-135m.graphml": "smollm2-135m",
    "yolov5n.graphml": "yolov5n.yaml",
}


def graphml_text(spec: str) -> str:
    lm = load_model(spec)
    graph = CompGraph(lm.model, lm.example_inputs, lm.forward_fn)
    return "\n".join(nx.generate_graphml(graph.sorted_graph())) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "graphs")
    out.mkdir(parents=True, exist_ok=True)
    for fname, spec in GOLDEN_SPECS.items():
        text = graphml_text(spec)
        write_output_file(out / fname, lambda tmp: Path(tmp).write_text(text), force=True)
        print(f"wrote {out / fname} ({spec})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
