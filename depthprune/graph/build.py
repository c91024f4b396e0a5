"""The computation graph: DepGraph's trace made semantic, readable and persistent."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

import networkx as nx
import torch.nn as nn

from .. import _tp
from .. import layers as K
from ..channels import not_tensor_layers, trace_channels
from ..errors import UserError
from ..offload import offloaded_modules
from .search import LIVE
from .trace import Recorder, module_path, traceable_output


def default_forward(model: nn.Module, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def trace_dependency_graph(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None):
    """A fresh DepGraph of the model as it is now (answers width-dependency questions)."""
    fwd = forward_fn or default_forward
    return trace_channels(model, example_inputs, lambda m, x: traceable_output(fwd(m, x)))


def _prefix_of(path: str, prefixes: list[str]) -> str | None:
    for p in prefixes:  # outermost first
        if path == p or path.startswith(p + ".") or path.startswith(p + "/"):
            return p
    return None


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class CompGraph:
    """Semantic computation graph of a model, kept for a whole pruning session.

    ``self.g`` is a `networkx.DiGraph`. Node ids are module paths (``model.layers.0.mlp.up_proj``)
    or ``<call path>/<op>#<k>`` for functional ops. Node attributes:

    - ``kind``: one of `depthprune.layers.KINDS`
    - ``state``: ``live`` until pruning changes it (see `depthprune.graph.search`)
    - ``module``: module path to replace for this node, ``""`` when it cannot be replaced
    - ``op``: torch function or module class name; ``params``: parameters it holds
    - ``in_shape``/``out_shape``: traced shapes (text); ``is_output``: feeds a model output
    - edges out of a multi-output op (a split) hold ``ports``: the outputs the consumer reads
    - concat nodes also hold ``operands`` (producer nodes in concatenation order) and ``cat``
      (``(dim, ndim)`` of the result); identity patching needs both
    - ops that cut one tensor into parts (chunk, split) hold ``split``: ``(dim, ndim, sizes)``

    ``collapse_attention=False`` keeps the transforms inside attention as their own nodes (what
    the intra-layer pruners need); depth pruning always collapses attention into one unit.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None,
                 collapse_attention: bool = True):
        self.model = model
        self.collapse_attention = collapse_attention
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn or default_forward
        self.calls: dict[str, Any] = {}
        self.g = nx.DiGraph()
        self._build()

    # ------------------------------------------------------------------------------------
    def _build(self) -> None:
        model = self.model
        rec = Recorder(model)
        was_training = model.training
        # parameters an accelerate offloading hook loads on every forward are written by design
        hooked = {id(m) for m, _ in offloaded_modules(model)}
        loaded = tuple(f"{n}." if n else "" for n, m in model.named_modules() if id(m) in hooked)
        versions = {n: p._version for n, p in model.named_parameters() if not (loaded and n.startswith(loaded))}
        ignored = not_tensor_layers(model, self.example_inputs, self.forward_fn)  # before the recorded run
        with rec:
            dg = trace_channels(model, self.example_inputs, rec.wrap_forward(self.forward_fn), ignored)
        model.train(was_training)
        written = [n for n, p in model.named_parameters() if n in versions and p._version != versions[n]]
        if written:
            raise UserError(f"the model's forward writes its own weights in place ({', '.join(written[:3])}"
                            f"{', ...' if len(written) > 3 else ''}): its saved weights would be in the written "
                            "state and written again when loaded, and a pruned layer's weight cannot be; "
                            "depthprune cannot prune it (if the model's configuration can turn that off, set it)")
        self.calls = {c.path: c for c in rec.calls}
        # calls per module: one called more than once (shared across depths) takes no stand-in
        self.module_calls = Counter(module_path(c.path) for c in rec.calls)

        # Attention units: the innermost module call that ran an attention kernel and holds a
        # transform, or a module of a registered attention class. Keep the outermost of nested ones.
        att = []
        for c in rec.calls:
            if K.is_attention_module(c.module):
                att.append(c.path)
            elif c.attention_kernel:
                for path in reversed(c.stack):
                    m = self.calls[path].module
                    if any(K.is_transform_module(s) for s in m.modules()):
                        att.append(path)
                        break
        experts = self._expert_calls(rec.calls, att)
        att = sorted(set(att) | experts, key=lambda p: (p.count("."), p))
        #: collapsed units (attention operations and mixtures of experts), outermost of nested ones
        self.attention_paths = [p for p in att if _prefix_of(p, [q for q in att if q != p]) is None]
        self.expert_paths = experts & set(self.attention_paths)
        if not self.collapse_attention:  # every transform inside attention is its own node
            self.attention_paths, self.expert_paths = [], set()
        module2name = {m: n for n, m in model.named_modules()}
        module_nodes = {module2name.get(n.module, "") for n in _tp.nodes(dg)
                        if _tp.is_module_node(n) and isinstance(n.module, nn.Module)}
        units = set(self.attention_paths) | {c.path for c in rec.calls if module_path(c.path) in module_nodes}
        units |= {c.path for c in rec.calls if K.is_norm_module(c.module)}
        unit_set = set(units)
        activation_calls = {c.path for c in rec.calls if _is_activation_call(c)}
        key_of: dict[Any, str] = {}
        unknown = 0
        outputs = 0
        g = self.g
        out_fns = {t.grad_fn for t in rec.outputs if t.grad_fn is not None}

        def add(key, **attrs):
            if key not in g:
                base = dict(kind=K.OTHER, state=LIVE, module="", op="", params=0,
                            in_shape="", out_shape="", is_output=False)
                base.update(attrs)
                g.add_node(key, **base)

        for node in _tp.nodes(dg):
            m = node.module
            if _tp.is_output_node(node):
                key = f"output#{outputs}"
                outputs += 1
                add(key, kind=K.OUTPUT, op="output")
            elif _tp.is_module_node(node) and isinstance(m, nn.Module):
                name = module2name.get(m, "")
                unit = _prefix_of(name, self.attention_paths)
                if unit is not None:
                    key = unit
                    add(key, **self._unit_attrs(unit, self.collapsed_kind(unit)))
                else:
                    key = name
                    add(key, **self._unit_attrs(name, self._module_kind(m)))
            else:
                r = rec.ops.get(_tp.node_grad_fn(node))
                fn = node.grad_fn.name() if hasattr(node.grad_fn, "name") else "op"
                if r is None and fn.endswith("AccumulateGrad"):
                    continue  # a parameter read as a tensor (attention sinks, fused expert weights): no data flows in
                if r is None:
                    key = f"?/{fn}#{unknown}"
                    unknown += 1
                    add(key, op="unknown")
                else:
                    unit = next((p for p in r.stack if p in unit_set), None)
                    if unit is not None:
                        key = unit if unit in self.attention_paths else module_path(unit)
                        um = model.get_submodule(module_path(key))
                        add(key, **self._unit_attrs(key, self.collapsed_kind(key) if key in self.attention_paths
                                                    else self._module_kind(um)))
                    elif r.call in activation_calls:
                        # every op of an activation module call is that one activation node
                        call = self.calls[r.call]
                        key = r.call
                        replaceable = self.module_calls[module_path(r.call)] == 1
                        add(key, kind=K.ACTIVATION, op=call.activation, module=r.call if replaceable else "",
                            in_shape=str(call.in_shape), out_shape=str(call.out_shape))
                    elif r.func in K.ACTIVATION_FUNCS:
                        key = f"{r.call or 'root'}/{r.name}#{r.index}"
                        add(key, kind=K.ACTIVATION, op=r.name)
                    else:
                        key = f"{r.call or 'root'}/{r.name}#{r.index}"
                        kind = (K.CONCAT if r.func in K.CONCAT_FUNCS
                                else K.ARITH if r.func in K.ARITH_FUNCS and r.n_graph_inputs >= 2 else K.OTHER)
                        extra = {"cat": r.cat} if kind == K.CONCAT else {"split": r.split} if r.split else {}
                        add(key, kind=kind, op=r.name, **extra)
            key_of[node] = key
            if _tp.node_grad_fn(node) in out_fns:
                g.nodes[key]["is_output"] = True

        for node, key in key_of.items():
            for inp in node.inputs:
                src = key_of.get(inp)
                if src is not None and src != key:
                    g.add_edge(src, key)
                    if _tp.is_multi_output(inp):  # which pieces of a split this edge carries
                        g.edges[src, key]["ports"] = tuple(_tp.output_ports(node, inp))
            if g.nodes[key]["kind"] == K.CONCAT and _tp.is_concat_node(node):
                # operands in concatenation order (DepGraph keeps autograd's)
                g.nodes[key]["operands"] = [key_of.get(i) for i in node.inputs]
        for n in list(g.nodes):
            if any(g.nodes[s]["kind"] == K.OUTPUT for s in g.successors(n)):
                g.nodes[n]["is_output"] = True
        # The DepGraph trace is not kept: it goes stale as soon as the model changes
        # (`trace_dependency_graph` gives a fresh one), and it cannot be deep-copied.

    def collapsed_kind(self, path: str) -> str:
        """The kind of the collapsed unit ``path`` (one of ``attention_paths``)."""
        return K.EXPERTS if path in self.expert_paths else K.ATTENTION

    def _expert_calls(self, calls, attention: list[str]) -> set[str]:
        """Mixtures of experts whose expert weights are stacked (a parameter of one matrix per
        expert: three or more dimensions, at least two experts; read as a tensor, so no layer the
        graph can prune): the outermost call around them that keeps its hidden input's shape, inside
        any call that holds an attention operation or adds its own input (a residual block): the
        sparse MoE block with its router and shared experts (its tokens may come out flattened, and
        its stand-in then returns them as its input holds them)."""
        out = set()
        for c in calls:
            if isinstance(c.module, nn.modules.conv._ConvNd) or not any(
                    p.dim() >= 3 and p.shape[0] >= 2 and min(p.shape[-2:]) >= 2
                    for p in c.module.parameters(recurse=False)):
                continue
            best = None
            for path in reversed(c.stack):
                call = self.calls[path]
                if call.adds_input or any(_prefix_of(a, [path]) is not None for a in attention):
                    break
                same = call.hidden_arg is not None and call.in_shape == call.out_shape
                if call.in_shape is not None and (same or call.flat_arg is not None):
                    best = path
            if best is not None:
                call = self.calls[best]
                call.hidden_arg = call.hidden_arg or call.flat_arg
                out.add(best)
        return out

    @staticmethod
    def _module_kind(m: nn.Module) -> str:
        return K.module_kind(m) or K.OTHER

    def _unit_attrs(self, path: str, kind: str) -> dict:
        m = self.model.get_submodule(module_path(path))
        call = self.calls.get(path)
        shared = self.module_calls[module_path(path)] > 1  # replacing it would change every depth that calls it
        return dict(kind=kind, module="" if shared else path, op=type(m).__name__, params=_param_count(m),
                    in_shape=str(call.in_shape) if call else "", out_shape=str(call.out_shape) if call else "")

    # ------------------------------------------------------------------------------------
    def nodes_of(self, kind: str) -> list[str]:
        return [n for n, d in self.g.nodes(data=True) if d["kind"] == kind]

    def summary(self) -> dict:
        counts = Counter(d["kind"] for _, d in self.g.nodes(data=True))
        return {
            "nodes": self.g.number_of_nodes(),
            "edges": self.g.number_of_edges(),
            "transforms": counts[K.TRANSFORM],
            "activations": counts[K.ACTIVATION],
            "norms": counts[K.NORM],
            "arithmetic": counts[K.ARITH],
            "concat": counts[K.CONCAT],
            "attention": counts[K.ATTENTION],
            "experts": counts[K.EXPERTS],
            "embeddings": counts[K.EMBEDDING],
            "other": counts[K.OTHER],
            "outputs": counts[K.OUTPUT],
        }

    def to_graphml(self, path: str) -> None:
        nx.write_graphml(self.sorted_graph(), path)

    def sorted_graph(self) -> nx.DiGraph:
        """A copy with nodes and edges in sorted order (stable files)."""
        h = nx.DiGraph()
        for n in sorted(self.g.nodes):
            h.add_node(n, **{k: v for k, v in sorted(self.g.nodes[n].items()) if _scalar(v)})
        h.add_edges_from(sorted(self.g.edges))
        return h

    def to_json(self) -> str:
        h = self.sorted_graph()
        return json.dumps({
            "summary": self.summary(),
            "nodes": [{"id": n, **d} for n, d in h.nodes(data=True)],
            "edges": [list(e) for e in h.edges],
        }, indent=1)


def _is_activation_call(c) -> bool:
    """A call of a leaf module that runs an activation function and either runs nothing else
    (``nn.SiLU``) or is an element-wise function of its input with at most scalar parameters
    (a tanh-GELU written out as pow/mul/add/tanh, a learnable xIELU): it is one activation
    node, replaceable by identity."""
    if not c.path or c.activation is None or any(True for _ in c.module.children()):
        return False
    scalar_params = all(p.numel() == 1 for p in c.module.parameters())
    return c.n_ops == 1 or (scalar_params and c.in_shape == c.out_shape)


def _scalar(v) -> bool:
    return isinstance(v, (str, int, float, bool))
