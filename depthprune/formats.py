"""Format numbers of what depthprune writes, in a module that imports nothing (read by light
checks before torch loads)."""

PLAN_FORMAT = 1  # plan.json
