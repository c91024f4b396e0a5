"""Repeated blocks of a model and the inputs each block receives, found generically.

`find_blocks` takes the longest `nn.ModuleList` of same-class modules (a Transformer's decoder
layers, a ViT's encoder blocks), or of a few repeating classes (a hybrid stack). `BlockInputs`
runs the model once per calibration batch with every block swapped for a recorder, so it costs
about the embedding layers, not a dense forward: it keeps the hidden states entering the first block and, for every block, the other
positional and keyword arguments it was called with (attention masks, rotary embeddings, ...).
``call(b, hidden, i)`` then evaluates block ``b`` (or a stand-in for it) on any hidden states.
No model's forward is read: the hidden argument is the tensor argument shaped like the block's
output.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .errors import UserError
from .graph.build import default_forward


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the model's repeated blocks, in order; [] when there are none.

    The longest ``nn.ModuleList`` of same-class modules, or a longer one whose modules all hold
    parameters and repeat a class (a hybrid stack: Jamba's attention and Mamba decoder layers)."""
    best: tuple[str, list] | None = None
    mixed: tuple[str, list] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2:
            kids = list(m)
            classes = [type(k) for k in kids]
            if len(set(classes)) == 1 and any(True for k in kids for _ in k.parameters()):
                if best is None or len(kids) > len(best[1]):
                    best = (name, kids)
            elif len(set(classes)) < len(kids) and all(any(True for _ in k.parameters()) for k in kids):
                if mixed is None or len(kids) > len(mixed[1]):
                    mixed = (name, kids)
    if mixed is not None and (best is None or len(mixed[1]) > len(best[1])):
        best = mixed
    if best is None:
        return []
    return [(f"{best[0]}.{i}", k) for i, k in enumerate(best[1])]


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise UserError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


class _Stop(Exception):
    pass


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    where: tuple  # ("arg", i) or ("kwarg", name): the hidden-states argument


class _StandIn(nn.Module):
    """A module standing in for a block (``self.real[0]``) for a while. A model may read its
    layers' attributes while it runs them (Nemotron-H's ``block_type``): they are the real block's."""

    real: list

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "real":
                raise
            return getattr(self.real[0], name)


class _Recorder(_StandIn):
    """Stands in for block ``index`` during capture: records the call, passes hidden through."""

    def __init__(self, owner: "BlockInputs", index: int, real: nn.Module):
        super().__init__()
        self.owner, self.index = owner, index
        self.real = [real]  # not a submodule

    def forward(self, *args, **kwargs):
        return self.owner._record(self.index, self.real[0], args, kwargs)


class NotChained(UserError):
    """The model's repeated modules are not a chain of blocks (parallel branches, or work between them)."""


def chained_blocks(model: nn.Module, example_inputs: Any, forward_fn: Callable | None) -> bool:
    """The model has repeated blocks (`find_blocks`) that run one after another on
    ``example_inputs``, each taking the previous one's output: what block scores and caches need
    (without ``example_inputs``: it has repeated blocks)."""
    if not find_blocks(model):
        return False
    if example_inputs is None:  # nothing to run: the structure alone
        return True
    try:
        BlockInputs(model, [example_inputs], forward_fn)
    except UserError:
        return False
    return True


class BlockInputs:
    """Cached inputs of every block over a list of calibration batches.

    Args:
        model: the model; ``blocks``: its blocks (default `find_blocks`).
        batches: model inputs, one per batch, each passed to ``forward_fn(model, batch)``.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any], forward_fn: Callable | None,
                 blocks: list[tuple[str, nn.Module]] | None = None):
        self.model = model
        forward_fn = forward_fn or default_forward  # None: the model called on the batch
        self.blocks = blocks if blocks is not None else find_blocks(model)
        if not self.blocks:
            raise UserError("the model has no repeated blocks (no nn.ModuleList of modules that repeat a class)")
        self.hidden: list[torch.Tensor] = []  # input of block 0, per batch
        self.calls: list[list[_Call]] = []  # [batch][block]
        self._structure: dict[int, Any] = {}  # block -> "tensor", or the rest of its output tuple
        self._current: list[_Call] = []
        self._passed: torch.Tensor | None = None  # what the last recorder returned
        paths = [p for p, _ in self.blocks]
        try:
            for i, (p, b) in enumerate(self.blocks):
                model.set_submodule(p, _Recorder(self, i, b))
            with torch.no_grad():
                for batch in batches:
                    self._current = []
                    try:
                        forward_fn(model, batch)
                    except _Stop:
                        pass
                    if len(self._current) != len(self.blocks):
                        raise UserError("not every block was called once per forward; cannot cache block inputs")
                    self.calls.append(self._current)
        finally:
            for p, (_, b) in zip(paths, self.blocks):
                model.set_submodule(p, b)

    def _record(self, index: int, real: nn.Module, args: tuple, kwargs: dict):
        hidden, where = _hidden_arg(args, kwargs)
        if index == 0:
            self.hidden.append(hidden.detach())
        elif not (hidden is self._passed or (hidden.shape == self._passed.shape and torch.equal(hidden, self._passed))):
            # the cache runs block b on block b - 1's output: exact only for a chain
            first, last = self.blocks[0][0], self.blocks[-1][0]
            raise NotChained(f"the repeated modules {first} .. {last} do not run one after another (block "
                             f"{self.blocks[index][0]} does not take the output of the one before): scores that "
                             "compare block inputs and outputs need such blocks; use --score output (any model) "
                             "or taylor")
        if index not in self._structure and (index == 0 or self._structure[0] != "tensor"):
            # what the model unpacks from each block (its outputs beyond the hidden states: a
            # hybrid stack's layers may differ), learnt once by running the real block
            out = real(*args, **kwargs)
            self._structure[index] = "tensor" if isinstance(out, torch.Tensor) else tuple(out)[1:]
        rest_args = tuple(None if where == ("arg", k) else a for k, a in enumerate(args))
        rest_kwargs = {k: (None if where == ("kwarg", k) else v) for k, v in kwargs.items()}
        self._current.append(_Call(rest_args, rest_kwargs, where))
        if index == len(self.blocks) - 1:
            raise _Stop
        self._passed = hidden
        return self.wrap(index, hidden)

    def wrap(self, b: int, hidden: torch.Tensor) -> Any:
        """``hidden`` as block ``b`` returns its hidden states (a tensor, or a tuple with its other
        outputs as first seen)."""
        rest = self._structure.get(b, self._structure.get(0, "tensor"))
        return hidden if rest == "tensor" else (hidden, *rest)

    def __len__(self) -> int:
        return len(self.hidden)

    def call(self, b: int, hidden: torch.Tensor, i: int, module: nn.Module | None = None) -> torch.Tensor:
        """Hidden states out of block ``b`` (or ``module`` standing in for it) for batch ``i``."""
        c = self.calls[i][b]
        args, kwargs = list(c.args), dict(c.kwargs)
        if c.where[0] == "arg":
            args[c.where[1]] = hidden
        else:
            kwargs[c.where[1]] = hidden
        return first_tensor((module if module is not None else self.blocks[b][1])(*args, **kwargs))

    @torch.no_grad()
    def outputs(self, b: int, inputs: list[torch.Tensor], module: nn.Module | None = None) -> list[torch.Tensor]:
        return [self.call(b, h, i, module) for i, h in enumerate(inputs)]


class _Cached(_StandIn):
    """Stands in for a block before ``b``: answers with block ``b``'s cached input (attributes
    are the real block's)."""

    def __init__(self, out: Any, real: nn.Module):
        super().__init__()
        self.out, self.real = out, [real]

    def forward(self, *args, **kwargs):
        return self.out


class BlockStates:
    """Every block's input and output on the model as it is now, per batch.

    ``refresh(start)`` recomputes them from block ``start`` on after the model changed there
    (nothing when ``start`` is past the last block);
    ``skip_to(b, i)`` makes the model's own forward on batch ``i`` start at block ``b``, the
    blocks before it answered from the cache (exact as long as nothing before block ``b``
    changed since the last refresh).
    """

    def __init__(self, cache: BlockInputs):
        self.cache = cache
        self.inputs: list[list[torch.Tensor]] = []  # [block][batch]
        self.outputs: list[list[torch.Tensor]] = []
        self.refresh(0)

    @torch.no_grad()
    def refresh(self, start: int = 0) -> None:
        del self.inputs[start:], self.outputs[start:]
        h = self.cache.hidden if start == 0 else self.outputs[start - 1]
        for b in range(start, len(self.cache.blocks)):
            self.inputs.append(h)
            h = self.cache.outputs(b, h)
            self.outputs.append(h)

    def passes(self, b: int) -> bool:
        """Block ``b`` passes its input on unchanged (pruned away completely), as of the last
        refresh of its states."""
        return torch.equal(self.inputs[b][0], self.outputs[b][0])

    @contextmanager
    def what_if(self, start: int, stop: int):
        """Blocks ``start..stop`` recomputed on the model as it is now (a trial), for the duration
        of the ``with`` block; then the states from before are put back as they were (nothing
        recomputed). States past ``stop`` are not touched: read only blocks up to ``stop``."""
        stop = min(stop, len(self.cache.blocks) - 1)
        saved = self.inputs[start:stop + 1], self.outputs[start:stop + 1]
        try:
            with torch.no_grad():
                h = self.cache.hidden if start == 0 else self.outputs[start - 1]
                for b in range(start, stop + 1):
                    self.inputs[b] = h
                    h = self.outputs[b] = self.cache.outputs(b, h)
            yield
        finally:
            self.inputs[start:stop + 1], self.outputs[start:stop + 1] = saved

    @contextmanager
    def skip_to(self, b: int, i: int):
        if b <= 0:
            yield
            return
        h = self.inputs[b][i]
        skipped = self.cache.blocks[:b]
        try:
            for k, (p, real) in enumerate(skipped):
                self.cache.model.set_submodule(p, _Cached(self.cache.wrap(k, h), real))
            yield
        finally:
            for p, m in skipped:
                self.cache.model.set_submodule(p, m)


def block_of(path: str, blocks: list[tuple[str, Any]]) -> int | None:
    """Index of the block containing the module ``path``, or None."""
    for i, (bp, _) in enumerate(blocks):
        if path == bp or path.startswith(bp + "."):
            return i
    return None


def first_block(paths: Iterable[str], blocks: list[tuple[str, Any]]) -> int:
    """Index of the first block containing any of ``paths``; 0 when one lies outside every block
    (it may act before block 0), ``len(blocks)`` when ``paths`` is empty."""
    first = len(blocks)
    for path in paths:
        b = block_of(path, blocks)
        first = min(first, 0 if b is None else b)
    return first


def _hidden_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return args[0], ("arg", 0)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], ("kwarg", "hidden_states")
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a, ("arg", k)
    raise UserError("cannot find the hidden-states argument of a block call")
