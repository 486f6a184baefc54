"""The frontend's tracer: torch.fx tracing of a module's forward, in the two modes the recognisers need.

Why fx alone is not enough. Symbolic tracing runs ``forward`` on Proxy objects, so it cannot follow
data-dependent Python (``if top_x.numel() == 0``, ``for n in counts.tolist()``), nor Python that
computes with sizes (``n_blocks = math.ceil(N / bs)``, ``for i in range(n_blocks)``). So:

- `trace_partial` (the MoE lifter): plain symbolic tracing with chosen leaf modules (the expert
  MLPs); at the first operation fx cannot follow, the trace stops and the graph recorded so far is
  kept (`Traced.complete` is False). In an MoE forward that prefix is the router, which is ordinary
  tensor code; the dispatch after it is not.
- `trace` (the MoBA matcher): shape-specialised. Every Proxy carries a value on the ``meta`` device
  (shapes, dtypes, strides; no data, no memory; a module call runs with meta copies of its
  parameters; a device the code asks for is the inputs'), so ``x.shape``, ``x.size(i)``,
  ``x.dtype``, ``x.device`` are concrete, Python arithmetic on them runs, loops unroll, and the graph
  holds the constants for *these* input shapes, like torch.compile's static-shape graphs. Factory
  functions (``arange``, ``zeros``, ``rand*``...) are recorded as nodes evaluated on meta tensors,
  so a ``[N, N]`` mask costs no memory. Every submodule is a leaf (its own forward runs at call time).
  The graph is replayed and rewritten, so Python-side state changes (``self.step += 1``) stop it.

Both stop at data-dependent operations: tensor *data* stays symbolic (``.item()``, ``bool(t)``,
``t.tolist()``, a data-dependent output shape such as ``nonzero``), so no data-dependent value is ever
baked into a graph. With one exception, for code whose loops run over index values (packed sequences'
``cu_seqlens`` read with ``.item()``): `trace` may be told ``host`` argument names (small integer
tensors) whose values it knows. Values computed from them, from constants and from deterministic
factories (``arange``, ``zeros``...) only, are carried as small CPU tensors (``node.meta["host"]``);
``.item()``, ``.tolist()``, ``int()`` and ``bool()`` of such a value return the Python value, baked into
the graph, and `signature` then keys the graph by those arguments' values too.

Both trace the user's own forward (the original class's, for a module moec has compiled) on a shallow
copy of the module, because fx may attach tensor constants to the root: the user's module is never
mutated, and training flags set for a trace are restored.

One specialised trace serves one call signature (`signature`): the shapes, dtypes and devices of
the tensor arguments (and the values of the host ones), the values of the others, the training flag and
the plain attributes of the module and of its ``config``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import threading
import types
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from .fx_ops import op_name, resolve_attr

_FACTORIES = ("arange", "zeros", "ones", "full", "empty", "eye", "rand", "randn", "randint", "linspace",
              "tril_indices", "triu_indices")
_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device)
# ops whose values are not a function of their arguments (never computed on the host)
_RANDOM = ("rand", "normal", "bernoulli", "multinomial", "dropout", "uniform", "exponential", "geometric", "cauchy",
           "empty", "poisson")
HOST_LIMIT = 4096          # most elements of a value carried on the host while tracing


class TraceFailed(Exception):
    """The forward could not be traced for this signature; the message says why."""


def describe_error(e: BaseException, first_sentence: bool = False) -> str:
    """``"Type: first line"`` of an error (or only its first sentence: fx's messages run long)."""
    text = str(e).splitlines()[0] if str(e) else ""
    if first_sentence:
        text = text.split(". ")[0]
    return f"{type(e).__name__}: {text}".strip()


def eager_forward(m: nn.Module):
    """A module's own forward, bound (the original class's, for modules moec has compiled)."""
    base = getattr(type(m), "_moec_base", None)
    return types.MethodType(base.forward, m) if base is not None else m.forward


def _meta(v):
    """A tensor's stand-in while tracing: same shape, dtype and strides, on the meta device (no data)."""
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return v.detach().to("meta")
    if isinstance(v, torch.device) or (isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda")):
        return torch.device("meta")
    return v


class _ValueProxy(fx.Proxy):
    """A Proxy whose shape, dtype and device are concrete (read from its node's meta value)."""

    def _val(self):
        v = self.node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            raise TraceFailed(f"{self.node.name} is not a tensor ({type(v).__name__})")
        return v

    @property
    def shape(self):
        return self._val().shape

    def size(self, dim=None):
        return self._val().size() if dim is None else self._val().size(dim)

    def dim(self):
        return self._val().dim()

    ndimension = dim

    @property
    def ndim(self):
        return self._val().dim()

    def numel(self):
        return self._val().numel()

    @property
    def dtype(self):
        return self._val().dtype

    @property
    def device(self):
        return self.tracer.device

    @property
    def is_cuda(self):
        return self.tracer.device.type == "cuda"

    def is_floating_point(self):
        return self._val().is_floating_point()

    def __len__(self):
        return len(self._val())

    def _host(self, what: str):
        h = self.node.meta.get("host")
        if h is None:
            raise TraceFailed(f"call_method {what}: {self.node.name} is tensor data, unknown while tracing")
        self.tracer.host_read |= self.node.meta.get("host_from", set())
        return h

    def __index__(self):
        return int(self._host("__index__"))

    __int__ = __index__

    def __float__(self):
        return float(self._host("__float__"))

    def __setitem__(self, key, value):           # in-place writes: ``gate[:, s:e, j] = -inf``
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    # ``o_ += x`` writes into ``o_`` (a view, perhaps): recorded as the in-place operator, not as ``o_ = o_ + x``
    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


class Tracer(fx.Tracer):
    """`fx.Tracer` with chosen leaf modules (``leaves``; None: every submodule). Given ``inputs`` (the
    forward's arguments by name), its proxies carry meta-tensor values (``node.meta["val"]``) of
    tensors that all live on ``device``, which proxies report."""

    def __init__(self, leaves: Optional[Iterable[nn.Module]] = None, inputs: Optional[dict[str, Any]] = None,
                 device: Optional[torch.device] = None, host: Iterable[str] = ()):
        super().__init__(autowrap_modules=(math,))
        self.leaves = None if leaves is None else {id(m) for m in leaves}
        self.inputs = None if inputs is None else {n: _meta(v) for n, v in inputs.items()}
        self.host = {n: inputs[n].detach().cpu().clone() for n in host} if host else {}
        self.host_read: set = set()  # the host arguments whose values the graph bakes in
        self.device = device
        self._computing = 0          # > 0 while a node's meta value is computed: plain torch, no recording

    def proxy(self, node):
        return _ValueProxy(node, self) if self.inputs is not None else super().proxy(node)

    def is_leaf_module(self, m, qualname):
        return self.leaves is None or id(m) in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if self._computing:
            return eager_forward(m)(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_method" and target in ("item", "tolist") and isinstance(args[0], _ValueProxy) \
                and args[0].node.meta.get("host") is not None:
            return getattr(args[0]._host(target), target)()          # a known value: baked into the graph
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.inputs is None:
            return p
        if kind == "placeholder":           # concrete arguments get placeholders named "<name>_<i>"
            name = str(target).lstrip("*")
            key = name if name in self.inputs else name.rpartition("_")[0]
            p.node.meta["val"] = self.inputs.get(key)
            if key in self.host:
                p.node.meta["host"], p.node.meta["host_from"] = self.host[key], {key}
        elif kind == "get_attr":
            p.node.meta["val"] = _meta(resolve_attr(self.root, target))
        elif kind in ("call_function", "call_method", "call_module"):
            p.node.meta["val"] = self._compute(kind, target, args, kwargs)
            if kind != "call_module":
                self._compute_host(p.node, target, args, kwargs)
        return p

    def to_bool(self, obj):
        if isinstance(obj, _ValueProxy) and obj.node.meta.get("host") is not None:
            return bool(obj._host("__bool__"))
        return super().to_bool(obj)

    def _compute_host(self, node: fx.Node, target, args, kwargs) -> None:
        """``node.meta["host"]``: the value on the CPU when every tensor it reads is known there (host
        arguments, their descendants, small deterministic factories) and it is small."""
        leaves = []
        fx.node.map_aggregate((args, kwargs), lambda a: leaves.append(a) if isinstance(a, fx.Proxy) else None)
        name = getattr(target, "__name__", target)
        factory = node.op == "call_function" and name in _FACTORIES and not leaves
        random = isinstance(name, str) and any(r in name for r in _RANDOM)
        if not leaves and not factory or random or any(p.node.meta.get("host") is None for p in leaves):
            return
        if not all(_small(v) for v in tree_leaves(node.meta.get("val"))):
            return
        def value(a):
            return a.node.meta["host"] if isinstance(a, fx.Proxy) else a
        a, kw = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        if factory:
            kw = {**kw, "device": torch.device("cpu")}
        self._computing += 1
        try:
            got = target(*a, **kw) if node.op == "call_function" else getattr(a[0], target)(*a[1:], **kw)
        except Exception:  # noqa: BLE001 - no host value: the meta value stands, data stays unknown
            return
        finally:
            self._computing -= 1
        node.meta["host"] = got
        node.meta["host_from"] = set().union(*(p.node.meta.get("host_from", set()) for p in leaves))

    def _compute(self, kind, target, args, kwargs):
        def value(a):
            return a.node.meta.get("val") if isinstance(a, fx.Proxy) else _meta(a)
        a = fx.node.map_aggregate(args, value)
        kw = fx.node.map_aggregate(kwargs, value)
        self._computing += 1
        try:
            if kind == "call_function":
                if getattr(target, "__name__", None) in _FACTORIES and getattr(torch, target.__name__, None) is not None:
                    kw = {**kw, "device": torch.device("meta")}     # (a factory without a device too)
                return target(*a, **kw)
            if kind == "call_method":
                return a[0] if target in ("cpu", "cuda") else getattr(a[0], target)(*a[1:], **kw)
            mod = resolve_attr(self.root, target)
            state = {n: _meta(t) for n, t in [*mod.named_parameters(), *mod.named_buffers()]}
            return torch.func.functional_call(mod, state, tuple(a), kw, strict=False)
        except TraceFailed:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. data-dependent output shapes, shape errors
            what = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
            raise TraceFailed(f"{kind} {what}: {describe_error(e)}")
        finally:
            self._computing -= 1


def _small(v) -> bool:
    return not isinstance(v, torch.Tensor) or v.numel() <= HOST_LIMIT


@dataclass
class Bound:
    """A forward call bound to its signature: parameter names in order, their values."""

    names: tuple[str, ...]
    values: tuple

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: v for n, v in zip(self.names, self.values) if isinstance(v, torch.Tensor)}


@dataclass
class Traced:
    """A recorded forward: all of it, or (``complete`` False) up to where tracing ``stopped``."""

    graph: fx.Graph
    root: nn.Module              # the shallow copy the graph's get_attr / call_module targets live on
    complete: bool = True
    stopped: Optional[str] = None
    bound: Optional[Bound] = None            # shape-specialised traces: the call traced
    device: Optional[torch.device] = None    # ... and where its tensors live (node values are on ``meta``)
    host_read: frozenset = frozenset()       # ... and the host arguments whose values it baked in

    def kind(self, node: fx.Node) -> Optional[str]:
        """`op_name` of ``node``, submodule calls named by their class."""
        return op_name(node, self.root)

    def describe_stop(self) -> str:
        if self.complete:
            return "fx traced the whole forward"
        return f"fx trace stopped after {len(self.graph.nodes)} nodes: {self.stopped}"


@contextlib.contextmanager
def _traceable(module: nn.Module, training: Optional[bool]):
    """A shallow copy of ``module`` to trace (fx may set attributes on its root), of the user's own class,
    with every training flag set to ``training`` (None: as they are) until the trace ends. Buffers are
    put back as they were: a traced forward runs its in-place updates on them (``self.load += 1``)."""
    root = copy.copy(module)
    root.__class__ = getattr(type(module), "_moec_base", type(module))
    root._buffers = dict(module._buffers)
    flags = [(m, m.training) for m in module.modules()]
    bufs = [(m, n, b, b.detach().clone()) for m in module.modules() for n, b in m._buffers.items()
            if isinstance(b, torch.Tensor)]
    try:
        if training is not None:
            for m, _ in flags:
                m.training = training
            root.training = training
        yield root
    finally:
        for m, f in flags:
            m.training = f
        with torch.no_grad():
            for m, n, b, saved in bufs:
                m._buffers[n] = b
                if not b.is_meta:
                    b.copy_(saved)


def trace_partial(module: nn.Module, leaves: Iterable[nn.Module] = (), training: Optional[bool] = None) -> Traced:
    """Symbolically trace ``module.forward``; on the first failure keep what was recorded."""
    tracer = Tracer(leaves)
    complete, stopped = True, None
    with _traceable(module, training) as root:
        try:
            tracer.trace(root)
        except Exception as e:  # noqa: BLE001 - any failure ends the trace; the prefix is kept
            complete, stopped = False, describe_error(e, first_sentence=True)
    graph = getattr(tracer, "graph", None) or fx.Graph()
    _name_buffers(graph, root, module)
    return Traced(graph, root, complete, stopped)


def _name_buffers(graph: fx.Graph, root: nn.Module, module: nn.Module) -> None:
    """fx records buffers (or eager views of them, e.g. ``bias.unsqueeze(0)``) used inside traced
    submodules as new "_tensor_constantN" attributes of the root; point them back at the buffer.
    Only for graphs that are read, never run: a view's node then names the whole buffer."""
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


def _factory(tracer: Tracer, name: str, fn, thread: int):
    def wrapper(*args, **kwargs):
        if tracer._computing or threading.get_ident() != thread:    # other threads see plain torch
            return fn(*args, **kwargs)
        return tracer.create_proxy("call_function", fn, args, kwargs)
    wrapper.__name__ = name
    return wrapper


@contextlib.contextmanager
def _specialising(tracer: Tracer, root: nn.Module):
    """While ``tracer`` runs (on this thread only): torch's factories record nodes, and a module
    attribute assignment stops the trace (a graph cannot replay Python-side state updates)."""
    saved = {n: getattr(torch, n) for n in _FACTORIES if hasattr(torch, n)}
    thread = threading.get_ident()
    setattr_ = nn.Module.__setattr__

    def no_state_changes(m, name, value):
        if threading.get_ident() == thread and not tracer._computing \
                and not (m is root and name.startswith("_tensor_constant")):
            raise TraceFailed(f"forward assigns {type(m).__name__}.{name}: module state changes cannot be "
                              "replayed by a traced graph")
        setattr_(m, name, value)

    for n, fn in saved.items():
        setattr(torch, n, _factory(tracer, n, fn, thread))
    nn.Module.__setattr__ = no_state_changes
    try:
        yield
    finally:
        nn.Module.__setattr__ = setattr_
        for n, fn in saved.items():
            setattr(torch, n, fn)


def host_candidates(bound: Bound) -> tuple[str, ...]:
    """The arguments `trace` may read on the host: integer tensors of at most `HOST_LIMIT` elements."""
    return tuple(n for n, t in bound.tensors().items()
                 if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
                 and t.numel() <= HOST_LIMIT)


def trace(module: nn.Module, bound: Bound, host: Iterable[str] = ()) -> Traced:
    """Trace ``module.forward`` specialised to ``bound`` (tensor arguments are placeholders with meta
    values, the others concrete; the ``host`` arguments' values known, see the module's docstring).
    Raises TraceFailed with the reason."""
    tensors = bound.tensors()
    concrete = {n: v for n, v in zip(bound.names, bound.values) if n not in tensors}
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise TraceFailed(f"tensor arguments on several devices {sorted(map(str, devices))}")
    tracer = Tracer(None, dict(zip(bound.names, bound.values)), devices.pop() if devices else torch.device("cpu"),
                    host)
    with _traceable(module, None) as root, _specialising(tracer, root):
        try:
            graph = tracer.trace(root, concrete_args=concrete or None)
        except TraceFailed:
            raise
        except Exception as e:  # noqa: BLE001 - fx's own errors (control flow on a tensor value, ...)
            raise TraceFailed(describe_error(e)) from None
    return Traced(graph, root, bound=bound, device=tracer.device, host_read=frozenset(tracer.host_read))


# ----------------------------------------------------------------------------------------------
# Call signatures: what one specialised trace is valid for
# ----------------------------------------------------------------------------------------------

def bind(module: nn.Module, args: tuple, kwargs: dict) -> Bound:
    """Bind a call to ``forward``'s signature (defaults applied); raises TraceFailed for ``*args``/``**kw``."""
    sig = inspect.signature(eager_forward(module))
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceFailed(f"forward takes *{p.name}: only named parameters can be traced")
    b = sig.bind(*args, **kwargs)
    b.apply_defaults()
    for name, v in b.arguments.items():
        if isinstance(v, (tuple, list, dict)) and any(isinstance(t, torch.Tensor) for t in tree_leaves(v)):
            raise TraceFailed(f"forward argument {name!r} holds tensors inside a {type(v).__name__}: only "
                              "tensors passed directly are traced (a container's would be baked in)")
    return Bound(tuple(b.arguments), tuple(b.arguments.values()))


def _describe(v) -> Optional[tuple]:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device)
    if isinstance(v, _SIMPLE):
        return ("value", type(v).__name__, v)
    if isinstance(v, tuple):        # (a list, dict or set may be changed by forward, which a graph cannot replay)
        parts = tuple(_describe(x) for x in v)
        return None if None in parts else ("seq", type(v).__name__, parts)
    return None


def signature(module: nn.Module, bound: Bound, host: Iterable[str] = ()) -> Optional[tuple]:
    """A hashable key for one specialised trace, or None when an argument cannot be keyed. The module's
    plain public attributes (``self.top_k = 4``) and its config's are part of it: the trace reads them as
    constants; so
    are the values of the ``host`` arguments (a copy to the host: what the forward's ``.item()`` reads)."""
    host = set(host)
    parts = tuple(_describe(v) + (tuple(v.flatten().tolist()),) if n in host and isinstance(v, torch.Tensor)
                  else _describe(v) for n, v in zip(bound.names, bound.values))
    if None in parts:
        return None
    return (module.training, _plain(module), _plain(getattr(module, "config", None)), bound.names, parts)


def _plain(obj) -> tuple:
    """An object's plain public attributes (a module's ``top_k``, its config's ``moba_topk``)."""
    if obj is None or not hasattr(obj, "__dict__"):
        return ()
    return tuple(sorted((k, v) for k, v in vars(obj).items()
                        if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))
