"""Weight layouts of transforms that torch-pruning does not know, one registration per layer type.

A layer type registered with a layout (`depthprune.layers.register_transform`) is a transform
node in the graph, gets a channel pruner in DepGraph (`depthprune.layers.pruners.LayoutPruner`)
and is counted like a ``Linear``. Layer types of other libraries are named ``"module:Class"`` and
resolved only once that module has been imported (a model holding such a layer has imported its
class), so nothing here imports them; `FOREIGN_LAYOUTS` lists the built-in ones.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightLayout:
    """Where a transform keeps its channels: the ``weight`` dimension indexed by input and by
    output channels (the ``bias`` is indexed by output channels), and the attributes that hold
    the two widths (updated by width pruning)."""

    in_dim: int
    out_dim: int
    in_attr: str | None = None
    out_attr: str | None = None


#: Layer types of other libraries, by name.
FOREIGN_LAYOUTS: dict[str, WeightLayout] = {
    # Hugging Face's transposed linear (``y = x @ W + b``, ``W: [in, out]``): GPT-2, GPT-J-style
    "transformers.pytorch_utils:Conv1D": WeightLayout(in_dim=0, out_dim=1, in_attr="nx", out_attr="nf"),
}
