"""Capture: a partial torch.fx trace of an MoE forward, and the graph helpers that read it.

Why this route. torch.fx symbolic tracing runs ``forward`` on Proxy objects, so it cannot follow
data-dependent Python: ``if top_x.numel() == 0``, ``for n in counts.tolist()``, slicing by a
count, ``max(1, ceil(cf * T))``. Real MoE code is full of it, always *after* routing: the
router prefix (linear -> softmax/sigmoid -> (+ bias) -> (groups) -> top-k -> gather ->
renormalise -> scale) is ordinary tensor code, the expert dispatch is not. So we trace with a
`torch.fx.Tracer` whose expert MLPs are leaves, catch the error raised at the first
data-dependent operation, and keep the graph recorded up to there. That partial graph holds the
router prefix, from which `moec.frontend.router_hints.read_router` reads hints: which score
function, whether top-k comes before it, renormalisation, scaling, groups, a selection bias,
noise, top-k's k.
The expert structure comes from the module itself (ModuleList of MLPs, each traced on its own
by `moec.frontend.experts.read_expert`; or stacked 3-D parameters), not from the dispatch loop.
Hints are proposals: where the code leaves a choice open, `moec.frontend.candidates` enumerates
the few candidate configurations and the probe (run eager forward vs `moec.reference.moe`) decides.
Tracing never mutates the user's module: the root is a shallow copy (fx may attach tensor
constants to it) and training flags are restored.
This module holds the graph machinery: op kinds (one name per node whatever the spelling), graph
walks, the partial tracer, and what the graph says about the experts (`stacked_usage`,
`module_calls_depend_on`); the router idioms are read in `router_hints`.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Op kinds: one normalised name per fx node, whatever spelling the user chose
# ----------------------------------------------------------------------------------------------

_FUNCS: dict = {}


def _reg(kind: str, *targets) -> None:
    for t in targets:
        if t is not None:
            _FUNCS[t] = kind


_reg("softmax", torch.softmax, F.softmax, getattr(torch.special, "softmax", None))
_reg("sigmoid", torch.sigmoid, F.sigmoid, getattr(torch.special, "expit", None))
_reg("topk", torch.topk)
_reg("argmax", torch.argmax)
_reg("max", torch.max, torch.amax)
_reg("sum", torch.sum)
_reg("div", operator.truediv, operator.itruediv, torch.div, torch.true_divide)
_reg("mul", operator.mul, operator.imul, torch.mul)
_reg("add", operator.add, operator.iadd, torch.add)
_reg("randn", torch.randn_like, torch.randn, torch.normal, torch.rand_like)
_reg("softplus", F.softplus)
_reg("linear", F.linear)
_reg("matmul", torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.einsum)
_reg("silu", F.silu)
_reg("relu", F.relu, torch.relu)
_reg("gelu", F.gelu)
_reg("tanh", torch.tanh, F.tanh)
_reg("getitem", operator.getitem)
_reg("chunk", torch.chunk, torch.split)
_reg("view", torch.reshape)
_reg("transpose", torch.t, torch.transpose)

_METHODS = {
    "softmax": "softmax", "sigmoid": "sigmoid", "topk": "topk", "argmax": "argmax", "max": "max",
    "amax": "max", "sum": "sum", "div": "div", "div_": "div", "mul": "mul", "mul_": "mul",
    "add": "add", "add_": "add", "matmul": "matmul", "mm": "matmul", "bmm": "matmul",
    "relu": "relu", "tanh": "tanh", "chunk": "chunk", "split": "chunk", "view": "view",
    "reshape": "view", "normal_": "randn", "t": "transpose", "transpose": "transpose",
}

_MODULES = (
    (nn.Softmax, "softmax"), (nn.Sigmoid, "sigmoid"), (nn.Softplus, "softplus"), (nn.SiLU, "silu"),
    (nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.Tanh, "tanh"), (nn.Linear, "linear"),
    (nn.Dropout, "identity"), (nn.Identity, "identity"),
)

# casts and layout changes that do not change which tensor a value "is"
_PASS_METHODS = {"float", "half", "bfloat16", "to", "type", "contiguous", "t", "transpose", "unsqueeze",
                 "view", "reshape", "expand", "squeeze", "detach"}

ACTIVATION_KINDS = ("silu", "gelu", "gelu_tanh", "relu", "tanh")


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
    """A normalised name for what ``node`` computes (None: not one we care about)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        for cls, kind in _MODULES:
            if isinstance(m, cls):
                if kind == "gelu" and getattr(m, "approximate", "none") == "tanh":
                    return "gelu_tanh"
                return kind
        return None
    if node.op == "call_function":
        kind = _FUNCS.get(node.target)
        if kind == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh"
        if node.target is F.dropout:
            return "identity"
        return kind
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def origin(node, passthrough=_PASS_METHODS):
    """Walk back through casts/views/transposes to where a value comes from."""
    while isinstance(node, fx.Node):
        if node.op == "call_method" and node.target in passthrough and node.args:
            node = node.args[0]
        elif node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            node = node.args[0]
        elif node.op == "call_function" and node.target in (torch.t, torch.transpose):
            node = node.args[0]
        else:
            break
    return node


def _reach(starts: Iterable[fx.Node], edges) -> set:
    """Every node reachable from ``starts`` (included) along ``edges(node)``."""
    seen, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(edges(n))
    return seen


def descendants(starts: Iterable[fx.Node]) -> set:
    return _reach(starts, lambda n: n.users)


def ancestors(start: fx.Node) -> set:
    return _reach([start], lambda n: n.all_input_nodes)


def int_arg(node: fx.Node, pos: int, name: str):
    """``node``'s literal int argument at ``pos`` or keyword ``name`` (None: absent or not an int)."""
    v = node.args[pos] if len(node.args) > pos else node.kwargs.get(name)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------------------------
# Partial tracing
# ----------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    def __init__(self, leaves: Iterable[nn.Module]):
        super().__init__(autowrap_modules=(math,))
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, qualname)


@dataclass
class Capture:
    """The graph recorded by fx up to the first data-dependent operation (or all of it)."""

    graph: fx.Graph
    modules: dict[str, nn.Module]
    complete: bool
    stopped: Optional[str] = None

    def kind(self, node: fx.Node) -> Optional[str]:
        return op_kind(node, self.modules)

    def describe_stop(self) -> str:
        if self.complete:
            return "fx traced the whole forward"
        return f"fx trace stopped after {len(self.graph.nodes)} nodes: {self.stopped}"


def trace_partial(module: nn.Module, leaves: Iterable[nn.Module] = (), training: Optional[bool] = None) -> Capture:
    """Symbolically trace ``module.forward``; on the first failure keep what was recorded."""
    root = copy.copy(module)   # fx may setattr tensor constants on the root
    flags = [(m, m.training) for m in module.modules()]
    tracer = _Tracer(leaves)
    complete, stopped = True, None
    try:
        if training is not None:
            for m, _ in flags:
                m.training = training
            root.training = training
        tracer.trace(root)
    except Exception as e:  # noqa: BLE001 - any failure ends the trace; the prefix is kept
        complete = False
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        stopped = f"{type(e).__name__}: {first}".strip()
    finally:
        for m, f in flags:
            m.training = f
    graph = getattr(tracer, "graph", None) or fx.Graph()
    # fx records buffers (or eager views of them, e.g. ``bias.unsqueeze(0)``) used inside traced
    # submodules as new "_tensor_constantN" attributes of the root; point them back at the buffer
    def key(t):
        try:
            return (t.untyped_storage().data_ptr(), t.numel()) if t.numel() else None
        except Exception:  # noqa: BLE001 - meta or exotic tensors: no mapping
            return None
    by_storage = {key(t): p for p, t in module.named_buffers() if key(t)}
    for n in graph.nodes:
        if n.op == "get_attr" and isinstance(vars(root).get(n.target), torch.Tensor):
            path = by_storage.get(key(vars(root)[n.target]))
            if path:
                n.target = path
    return Capture(graph, dict(module.named_modules()), complete, stopped)



def stacked_usage(cap: Capture, names: set) -> Optional[str]:
    """How the traced forward reads stacked expert weights: 'gather' (indexed by routed ids),
    'dense' (whole weight in an einsum/matmul), or None (not reached by the trace)."""
    for n in cap.graph.nodes:
        if n.op == "get_attr" and n.target in names:
            for u in n.users:
                k = cap.kind(u)
                if k == "getitem" and isinstance(u.args[1], fx.Node):
                    return "gather"
                if k in ("matmul", "linear"):
                    return "dense"
    return None


def module_calls_depend_on(cap: Capture, targets: set, starts_paths: set) -> Optional[bool]:
    """Whether calls to the modules ``targets`` (experts) take inputs derived from the router
    output (None: no such call was traced)."""
    router = [n for n in cap.graph.nodes if n.op == "call_module" and n.target in starts_paths]
    calls = [n for n in cap.graph.nodes if n.op == "call_module" and n.target in targets]
    if not calls or not router:
        return None
    down = descendants(router)
    return any(any(a in down for a in c.all_input_nodes) for c in calls)
