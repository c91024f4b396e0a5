"""Fold a BatchNorm into the convolution that feeds it (exact in eval mode)."""
from __future__ import annotations

import networkx as nx
import torch
import torch.nn as nn

from .identity import Identity


def foldable_pairs(g: nx.DiGraph, model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module paths where a Conv's only consumer is a BatchNorm."""
    pairs = []
    for n, d in g.nodes(data=True):
        if d["kind"] != "transform" or not d["module"]:
            continue
        succ = list(g.successors(n))
        if len(succ) != 1:
            continue
        bn = succ[0]
        m, b = model.get_submodule(d["module"]), g.nodes[bn]
        if (isinstance(m, nn.Conv2d) and b["kind"] == "norm" and b["module"]
                and isinstance(model.get_submodule(b["module"]), nn.BatchNorm2d)):
            pairs.append((d["module"], b["module"]))
    return sorted(pairs)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, conv_path: str, bn_path: str) -> None:
    conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = (conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean))
    b = (b - bn.running_mean) * scale + bn.bias
    conv.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
    model.set_submodule(bn_path, Identity())
