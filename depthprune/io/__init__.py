"""Output directories, formats and loading (DESIGN.md level 6)."""
