"""Per layer type: how it appears in the graph, its stand-ins, width pruning, and the structure
of a pruned model as data (DESIGN.md, "Homes for each kind of knowledge", level 1)."""
