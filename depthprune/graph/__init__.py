"""The computation graph (DESIGN.md, "The computation graph")."""
from .build import CompGraph, trace_dependency_graph
from .kinds import register_activation, register_attention, register_norm
from .search import backward_bounded_search, follow_identity_operand, forward_bounded_search
from .trace import module_path

__all__ = ["CompGraph", "trace_dependency_graph", "forward_bounded_search", "backward_bounded_search",
           "follow_identity_operand", "register_norm", "register_activation", "register_attention", "module_path"]
