"""The computation graph (docs/architecture.md, "How the graph is built")."""
from .build import CompGraph, trace_dependency_graph
from .search import backward_bounded_search, follow_identity_operand, forward_bounded_search
from .trace import module_path, natural_key

__all__ = ["CompGraph", "trace_dependency_graph", "forward_bounded_search", "backward_bounded_search",
           "follow_identity_operand", "module_path", "natural_key"]
