"""What every adapter returns: the loaded model (`LoadedModel`) and its family (`Family`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the CLI imports adapters before torch is needed
    import torch.nn as nn


@dataclass(frozen=True)
class Family:
    """What depthprune knows about one model family: one object per family
    (`depthprune.adapters.hf.CAUSAL_LM`, `depthprune.adapters.yolo.YOLO`, `GENERIC`), carried
    by every `LoadedModel` it loads, so no code outside `depthprune.adapters` asks which family
    a model is: it asks the family.

    ``name``: what messages call it; ``base_kind``: the base architecture's kind in a
    self-contained directory's ``structure.json`` (`build_base` reads it back); ``data``: what
    calibrates, evaluates and fine-tunes it (``"text"``: next-token text, ``"images"``: images
    and labelled detection data, None: its example inputs only); ``formats``: the export formats
    that apply (`depthprune.export.FORMATS`); ``user_model``: its forward is the user's own code
    (an error on its own example inputs is the user's, not a tracing failure). ``describe(lm)``:
    the base architecture as data; ``write_files(lm, structure, out)``: files the family adds
    to a model directory; ``calibration(lm, text_spec, samples, seq_len, batch_size)``: its
    calibration batches. `depthprune.adapters.load.build_base` builds a described base again,
    by its kind. Loading, example inputs, loss/logits and ``on_change`` are the `LoadedModel`
    fields the family's loader fills.
    """

    name: str
    base_kind: str
    data: str | None = None
    formats: tuple[str, ...] = ()
    user_model: bool = False
    describe: Callable[[LoadedModel], dict] | None = None
    write_files: Callable[[LoadedModel, dict, Path], None] | None = None
    calibration: Callable[..., list] | None = None


def _describe_python(lm: LoadedModel) -> dict:
    return {"kind": "python", "spec": lm.extra.get("base_spec", lm.spec)}


def _example_calibration(lm: LoadedModel, *_) -> list:
    return [lm.example_inputs]


#: a model built by the user's code (``python:``, `depthprune.adapters.generic`): its example
#: inputs are its calibration
GENERIC = Family("generic", "python", user_model=True, describe=_describe_python, calibration=_example_calibration)


@dataclass
class LoadedModel:
    """A model ready for depthprune.

    ``forward_fn(model, example_inputs)`` runs one traced forward; ``adapter`` is its
    `Family` (``family`` its name); ``recipe`` is the YAML recipe for the family
    (candidate exclusions and defaults), ``{}`` when none applies. ``loss_fn(model, batch)`` is
    the calibration loss Taylor importance differentiates (None: no Taylor for this model).
    """

    model: nn.Module
    example_inputs: Any
    spec: str
    adapter: Family = GENERIC
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
    #: models with a KV cache: ``kv_cache_fn(model)`` -> bytes the cache holds per token
    #: (`depthprune prune --budget kv-cache`); None for models without one
    kv_cache_fn: Callable | None = None

    @property
    def family(self) -> str:
        """The family's name (``causal_lm``, ``yolo``, ``generic``), for messages."""
        return self.adapter.name


def context_length(lm: LoadedModel) -> int | None:
    """The longest sequence the model accepts (the config's ``max_position_embeddings``, or the
    older names of it), None when unknown."""
    cfg = getattr(lm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len",
                 "context_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None
