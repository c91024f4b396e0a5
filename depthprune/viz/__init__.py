"""Pictures of pruned models, drawn from data (``graph.json``, ``plan.json``, ``report.json``).

- `graph_json` / `load_graph` / `apply_plan`: the graph data (see `depthprune.viz.graphdata`)
- `draw`: computation-graph drawings (Graphviz ``dot``, or a built-in layered layout)
- `build_map` / `plot_map`: the pruning map (thesis Figure 4.3)
- `curve_points` / `plot_curves`: trade-off curves from several ``report.json``
- `write_report`: ``report.html``, one self-contained file per output directory

matplotlib is imported only by the functions that plot.
"""
from .draw import draw, render, select
from .graphdata import GRAPH_FILE, apply_plan, graph_json, infer_blocks, load_graph

__all__ = ["GRAPH_FILE", "graph_json", "load_graph", "apply_plan", "infer_blocks", "draw", "render", "select"]
