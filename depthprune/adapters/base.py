"""What every adapter returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the CLI imports adapters before torch is needed
    import torch.nn as nn


@dataclass
class LoadedModel:
    """A model ready for depthprune.

    ``forward_fn(model, example_inputs)`` runs one traced forward; ``family`` is
    ``causal_lm``, ``yolo`` or ``generic``; ``recipe`` is the YAML recipe for the family
    (candidate exclusions and defaults), ``{}`` when none applies. ``loss_fn(model, batch)`` is
    the calibration loss Taylor importance differentiates (None: no Taylor for this model).
    """

    model: nn.Module
    example_inputs: Any
    spec: str
    family: str = "generic"
    forward_fn: Callable | None = None
    tokenizer: Any = None
    recipe: dict = field(default_factory=dict)
    loss_fn: Callable | None = None
    extra: dict = field(default_factory=dict)
    #: called with the model after every structural change (e.g. HF KV-cache layer indices)
    on_change: Callable[[nn.Module], None] | None = None
    #: language models: ``logits_fn(model, batch)`` -> next-token logits ``[batch, tokens, vocab]``
    #: and ``nll_fn(logits, batch)`` -> (summed next-token NLL, tokens); None for other models
    logits_fn: Callable | None = None
    nll_fn: Callable | None = None
    #: models trained on labelled data (detectors): ``labelled_batches(lm, data, samples, batch_size)``
    #: reads a labelled dataset, ``labelled_loss_fn(model, batch)`` is the training loss on it
    labelled_batches: Callable | None = None
    labelled_loss_fn: Callable | None = None
