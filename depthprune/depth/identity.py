"""Modules that stand in for pruned nodes. They hold no parameters."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn


class PrunedModule(nn.Module):
    """Base of every stand-in; ``state`` is the graph state it implements. ``attrs``: the
    replaced module's plain attributes (`plain_attributes`), which the model's own code may read
    of it (a layer's ``batch_first``, a conv's ``stride``)."""

    state = "identity"

    def __init__(self, hidden_arg: Any = ("arg", 0), out_structure: Any = "tensor", attrs: dict | None = None):
        super().__init__()
        self.hidden_arg = tuple(hidden_arg) if hidden_arg is not None else ("arg", 0)
        self.out_structure = tuple(out_structure) if isinstance(out_structure, (list, tuple)) else out_structure
        self.attrs = dict(attrs or {})
        for k, v in self.attrs.items():
            if k not in _OWN:
                setattr(self, k, tuple(v) if isinstance(v, list) else v)

    def _hidden(self, args, kwargs) -> torch.Tensor:
        where, key = self.hidden_arg
        return args[key] if where == "arg" else kwargs[key]

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _wrap(self, y: torch.Tensor):
        if isinstance(self.out_structure, tuple) and self.out_structure[0] == "tuple":
            _, n, i = self.out_structure
            out = [None] * n
            out[i] = y
            return tuple(out)
        return y

    def forward(self, *args, **kwargs):
        return self._wrap(self._value(self._hidden(args, kwargs)))

    def extra_repr(self) -> str:
        return f"state={self.state}"

    def spec(self) -> dict:
        out = {"state": self.state, "hidden_arg": list(self.hidden_arg),
               "out_structure": list(self.out_structure) if isinstance(self.out_structure, tuple) else self.out_structure}
        return {**out, "attrs": self.attrs} if self.attrs else out


class Identity(PrunedModule):
    """Returns its (hidden-states) input, in the replaced module's output structure.

    ``repeat=k`` stands in for a fused transform whose output is cut into ``k`` equal parts
    consumed separately (a gate and an up projection in one weight): the input repeated ``k``
    times along ``dim``, so that every part is the input, as if each fused transform were an
    identity."""
    state = "identity"

    def __init__(self, repeat: int = 1, dim: int = -1, **kw):
        super().__init__(**kw)
        self.repeat, self.dim = int(repeat), int(dim)

    def _value(self, x):
        return x if self.repeat == 1 else torch.cat([x] * self.repeat, dim=self.dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", repeat={self.repeat}, dim={self.dim}" if self.repeat != 1 else "")

    def spec(self) -> dict:
        extra = {"repeat": self.repeat, "dim": self.dim} if self.repeat != 1 else {}
        return {**super().spec(), **extra}


class Zero(PrunedModule):
    """Neutral operand of an addition."""
    state = "zero"

    def _value(self, x):
        return torch.zeros_like(x)


class One(PrunedModule):
    """Neutral operand of a multiplication."""
    state = "one"

    def _value(self, x):
        return torch.ones_like(x)


class Empty(PrunedModule):
    """Neutral operand of a concatenation along ``dim``."""
    state = "empty"

    def __init__(self, dim: int = 1, **kw):
        super().__init__(**kw)
        self.dim = dim

    def _value(self, x):
        # A constant, not a view of x: DepGraph then sees the concatenation's one live input.
        shape = list(x.shape)
        shape[self.dim] = 0
        return x.new_zeros(shape)

    def spec(self) -> dict:
        return {**super().spec(), "dim": self.dim}


STAND_INS = {c.state: c for c in (Identity, Zero, One, Empty)}
#: names a stand-in defines itself (never taken from the replaced module)
_OWN = frozenset({"state", "hidden_arg", "out_structure", "attrs", "repeat", "dim", "training"}
                 | {n for c in STAND_INS.values() for n in dir(c)})


def _plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return len(v) <= 16 and all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def plain_attributes(module: nn.Module) -> dict:
    """The public attributes of ``module`` that are plain data (numbers, strings, booleans, None,
    short lists or tuples of them): what a stand-in keeps of the module it replaces."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(module).items()
            if not k.startswith("_") and k not in _OWN and _plain(v)}


#: modules of torch whose inference fast path reads their sublayers' weights directly
_FUSED = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


def run_plain_paths(model: nn.Module, path: str) -> None:
    """PyTorch's ``nn.TransformerEncoder(Layer)`` run a fused kernel in inference that reads the
    weights of their sublayers; once one holds a stand-in (just placed at ``path``) it must take
    its plain path: turn torch's process-wide fast path off (`torch.backends.mha`), with a warning."""
    if not torch.backends.mha.get_fastpath_enabled():
        return
    parts = path.split(".")
    if any(isinstance(model.get_submodule(".".join(parts[:i])), _FUSED) for i in range(len(parts))):
        torch.backends.mha.set_fastpath_enabled(False)
        warnings.warn("depthprune turned PyTorch's transformer fast path off for this process "
                      "(torch.backends.mha): a pruned nn.TransformerEncoderLayer runs its plain path", stacklevel=2)


def make_stand_in(spec: dict) -> PrunedModule:
    cls = STAND_INS[spec["state"]]
    kw = {"hidden_arg": spec.get("hidden_arg"), "out_structure": spec.get("out_structure", "tensor"),
          "attrs": spec.get("attrs")}
    if cls is Empty:
        kw["dim"] = spec.get("dim", 1)
    if cls is Identity and spec.get("repeat", 1) != 1:
        kw.update(repeat=spec["repeat"], dim=spec["dim"])
    return cls(**kw)
