"""Layer types: the one public registry of what depthprune knows per layer type (docs/architecture.md, "Homes
for each kind of knowledge", level 1), and the structure of a pruned model as data.

- `registry`: a `LayerType` per layer type — its kind in the graph, its widths and channel
  dimensions, its width pruner (a torch-pruning ``BasePruningFunc``); `register_layer` and the
  shorthands `register_transform`, `register_norm`, `register_attention`,
  `register_layer_pruner`; the questions (`layer_type`, `module_kind`, `transform_widths`,
  `channel_dim`, `affine_widths`, `width_pruner`, `prune_channels`, ...);
- `kinds`: the node kinds (``transform``, ``norm``, ...) and the kinds of torch functions
  (`register_activation`);
- `layouts`: `WeightLayout`, where a transform torch-pruning does not know keeps its channels;
- `pruners`: the width pruners depthprune adds (`ScaleNormPruner`, `LayoutPruner`,
  `GroupedConvPruner`); a pruner of your own derives from `BasePruningFunc` (torch-pruning's);
- `structure`: a pruned model's structure as data (stand-ins, widths, ties).

Register your own layer type once, before building a `DepthPruner`::

    from depthprune.layers import NORM, TRANSFORM, WeightLayout, register_layer

    # y = x @ W + b with W: [in, out], widths in .n_in / .n_out
    register_layer(MyLinear, TRANSFORM, layout=WeightLayout(in_dim=0, out_dim=1, in_attr="n_in", out_attr="n_out"))
    register_layer(MyScaleNorm, NORM)  # one per-channel weight: pruned with the channels

Stand-ins (what a pruned unit becomes) live in `depthprune.depth.identity`: they depend on the
node's kind, not on its layer type, and their source ships with exported models.
"""
from .._tp import BasePruningFunc
from .kinds import (ACTIVATION, ARITH, ATTENTION, COLLAPSED, CONCAT, EMBEDDING, EXPERTS, KINDS, NORM, OTHER,
                    OUTPUT, TRANSFORM, UNIT_KINDS, ACTIVATION_FUNCS, ARITH_FUNCS, ATTENTION_KERNELS, CONCAT_FUNCS,
                    MATMUL_FUNCS, SOFTMAX_FUNCS, op_name, register_activation)
from .layouts import FOREIGN_LAYOUTS, WeightLayout
from .pruners import GroupedConvPruner, LayoutPruner, ScaleNormPruner, is_grouped_conv
from .registry import (LAYER_KINDS, NORM_NAME_SUFFIXES, SCALE_NORM_PRUNER, LayerType, affine_transposed, affine_weight,
                       affine_widths, channel_dim, class_pruners, is_attention_module, is_embedding_module,
                       is_foreign_norm, is_norm_module, is_transform_module, layer_type, layer_types, module_kind,
                       prune_channels, register_attention, register_layer, register_layer_pruner, register_norm,
                       register_transform, registered_pruner, registered_pruners, transform_layout,
                       transform_widths, unregister_layer, width_pruner)

__all__ = [
    # registry
    "LayerType", "register_layer", "unregister_layer", "register_transform", "register_norm", "register_attention",
    "register_layer_pruner", "register_activation", "layer_type", "layer_types", "module_kind",
    "is_transform_module", "is_norm_module", "is_attention_module", "is_embedding_module", "is_foreign_norm",
    "transform_layout", "transform_widths", "channel_dim", "affine_widths", "affine_transposed", "affine_weight",
    "width_pruner", "registered_pruner", "registered_pruners", "class_pruners", "prune_channels",
    "LAYER_KINDS", "NORM_NAME_SUFFIXES", "SCALE_NORM_PRUNER",
    # layouts and pruners
    "BasePruningFunc", "WeightLayout", "FOREIGN_LAYOUTS", "ScaleNormPruner", "LayoutPruner", "GroupedConvPruner",
    "is_grouped_conv",
    # kinds
    "TRANSFORM", "ACTIVATION", "NORM", "ARITH", "CONCAT", "ATTENTION", "EXPERTS", "EMBEDDING", "OTHER", "OUTPUT",
    "KINDS", "COLLAPSED", "UNIT_KINDS", "ACTIVATION_FUNCS", "ARITH_FUNCS", "CONCAT_FUNCS", "ATTENTION_KERNELS",
    "SOFTMAX_FUNCS", "MATMUL_FUNCS", "op_name",
]
