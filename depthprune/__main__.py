"""`python -m depthprune ...`: the command line (also under `torchrun` / `accelerate launch -m depthprune`)."""
from .cli import main

raise SystemExit(main())
