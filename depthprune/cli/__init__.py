"""The `depthprune` command: a thin layer over the library, one module per command.

`main` parses, builds the library's configs from flags, calls the library and prints. Heavy
libraries (torch, torch-pruning, transformers, ultralytics) and the library's own modules are
imported inside the command that uses them, so ``--help`` and argument errors return at once.
Every user mistake is one line on stderr and exit code 2; progress goes to stderr (``--quiet``
turns it off).
"""
from .args import traced
from .main import build_parser, main

__all__ = ["build_parser", "main", "traced"]
