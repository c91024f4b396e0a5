"""Output directories, reports and loading of what depthprune writes.

`outdir` (checks, lock, temporary sibling, marker, signals) and `report` are light: the CLI
uses them before it imports torch. `model_dir` saves and loads pruned models (safetensors +
JSON, never pickle, never code unless the caller passes ``trust_code``).
"""
