"""The computation graph (DESIGN.md, "The computation graph")."""
from .build import CompGraph, trace_dependency_graph
from .kinds import register_activation, register_attention, register_norm
from .search import backward_bounded_search, follow_identity_operand, forward_bounded_search

__all__ = ["CompGraph", "trace_dependency_graph", "forward_bounded_search", "backward_bounded_search",
           "follow_identity_operand", "register_norm", "register_activation", "register_attention"]
