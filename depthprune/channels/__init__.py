"""Channels: which channels of which layers go together when a layer's width changes.

What depthprune adds on top of torch-pruning's DepGraph (each measured on a model it broke):

- `trace_channels` / `DependencyGraph`: a DepGraph trace with the width pruners of
  `depthprune.layers` (consulted before torch-pruning's own) and exact channel correspondences
  through concatenations, splits and reshapes, read from the autograd nodes of the trace instead
  of torch-pruning's shape inference; after the trace it names ``width_barriers`` (why a node's
  channels cannot be removed consistently), ``channel_ties`` (`Tie`: channels that go together)
  and ``index_mapped`` nodes;
- `ChannelGroup`: DepGraph's propagation that keeps every root of every channel it reaches, so
  channels that must go together (one value concatenated twice, one group of a grouped conv, one
  offset of every `chunk` piece) are found from one traversal, and channels that cannot be
  removed consistently (a reshape that mixes channels, a fixed-size split) are named.
"""
from .group import ChannelGroup
from .maps import DependencyGraph, Tie, not_tensor_layers, trace_channels

__all__ = ["ChannelGroup", "DependencyGraph", "Tie", "not_tensor_layers", "trace_channels"]
