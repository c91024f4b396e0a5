"""depthprune: structural depth pruning at the finest granularity."""
__version__ = "0.1.0"
