"""`python -m depthprune.cli` (what `torchrun -m depthprune.cli` and the tests start)."""
from . import main

raise SystemExit(main())
