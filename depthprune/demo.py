"""`depthprune demo`: the main job on the packaged defaults."""
from __future__ import annotations

import json


def run(args) -> int:
    from .adapters import load_model
    from .graph import CompGraph
    lm = load_model("smollm2-135m")
    graph = CompGraph(lm.model, lm.example_inputs, lm.forward_fn)
    print("computation graph of smollm2-135m:", json.dumps(graph.summary()))
    return 0
