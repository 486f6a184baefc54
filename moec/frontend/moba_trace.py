"""Shape-specialised torch.fx tracing of a module's forward, for the MoBA frontend.

Why specialised. MoBA code computes with the sequence length in Python: ``n_blocks =
math.ceil(N / bs)``, ``topk(min(top_k, n_blocks))``, ``for i in range(n_blocks)``, slices by block.
Plain `torch.fx.symbolic_trace` makes ``N`` a Proxy and stops at the first such use. So this tracer
gives every Proxy a value on the ``meta`` device (shapes, dtypes, strides; no data, no memory; a
module call runs with meta copies of its parameters; a device the code asks for is the inputs'):
``x.shape``, ``x.size(i)``, ``x.dim()``, ``x.dtype``, ``x.device`` are concrete, Python arithmetic on
them runs, loops unroll, and the recorded graph holds the constants for *these* input shapes, like
torch.compile's static-shape graphs. Tensor *data* stays symbolic: ``.item()``, ``bool(t)``,
``t.tolist()`` or a data-dependent output shape (``nonzero``, boolean masking) still stop the trace,
so no data-dependent value is ever baked into a graph. Factory functions (``torch.arange``,
``zeros``, ``ones``, ``full``, ``empty``, ``eye``, ``rand*``) are recorded as graph nodes (evaluated on
meta tensors), so a ``[N, N]`` causal mask costs no memory while tracing.

One trace serves one call signature (`signature`): the shapes, dtypes and devices of the tensor
arguments, the values of the others, the module's training flag and plain attributes. Python-side state
changes (``self.step += 1``) stop the trace: a graph could not replay them. Submodules are leaves (their
own forward runs at call time; a MoBA core in a child module is that child's region). Tracing never
mutates the user's module: the root is a shallow copy (fx may attach tensor constants to it).
"""
from __future__ import annotations

import copy
import inspect
import math
import operator
import threading
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

_FACTORIES = ("arange", "zeros", "ones", "full", "empty", "eye", "rand", "randn", "randint", "linspace",
              "tril_indices", "triu_indices")
_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device)


class TraceFailed(Exception):
    """The forward could not be traced for this signature; the message says why."""


class _VProxy(fx.Proxy):
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

    def __setitem__(self, key, value):           # in-place writes: ``gate[:, s:e, j] = -inf``
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _eager_forward(m: nn.Module):
    """A module's own forward, bound (the original class's, for modules moec has compiled)."""
    base = getattr(type(m), "_moec_base", None)
    return types.MethodType(base.forward, m) if base is not None else m.forward


def resolve_attr(root: nn.Module, target: str):
    """``root.<target>`` without going through ``nn.Module.__getattr__`` (patched while tracing)."""
    obj = root
    for part in target.split("."):
        if isinstance(obj, nn.Module):
            for d in (obj._parameters, obj._buffers, obj._modules, obj.__dict__):
                if part in d:
                    obj = d[part]
                    break
            else:
                raise AttributeError(f"{type(obj).__name__} has no attribute {part!r}")
        else:
            obj = getattr(obj, part)
    return obj


def _meta(v):
    """A tensor's stand-in while tracing: same shape, dtype and strides, on the meta device (no data)."""
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return v.detach().to("meta")
    if isinstance(v, torch.device) or (isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda")):
        return torch.device("meta")
    return v


class ValueTracer(fx.Tracer):
    """`fx.Tracer` whose proxies carry meta-tensor values (``node.meta["val"]``); every submodule is a
    leaf. All tensors live on one ``device``, which proxies report (the values are on ``meta``)."""

    def __init__(self, inputs: dict[str, Any], device: torch.device):
        super().__init__(autowrap_modules=(math,))
        self.inputs = {n: _meta(v) for n, v in inputs.items()}
        self.device = device
        self._computing = 0

    def proxy(self, node):
        return _VProxy(node, self)

    def is_leaf_module(self, m, qualname):
        return True

    def call_module(self, m, forward, args, kwargs):
        if self._computing:
            return _eager_forward(m)(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":           # concrete arguments get placeholders named "<name>_<i>"
            name = str(target).lstrip("*")
            p.node.meta["val"] = self.inputs.get(name, self.inputs.get(name.rpartition("_")[0]))
        elif kind == "get_attr":
            p.node.meta["val"] = _meta(resolve_attr(self.root, target))
        elif kind in ("call_function", "call_method", "call_module"):
            p.node.meta["val"] = self._compute(kind, target, args, kwargs)
        return p

    def _compute(self, kind, target, args, kwargs):
        def val(a):
            return a.node.meta.get("val") if isinstance(a, fx.Proxy) else _meta(a)
        a = fx.node.map_aggregate(args, val)
        kw = fx.node.map_aggregate(kwargs, val)
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
            raise TraceFailed(f"{kind} {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            self._computing -= 1


def _factory_wrapper(tracer: ValueTracer, name: str, fn, thread: int):
    def wrapper(*args, **kwargs):
        if tracer._computing or threading.get_ident() != thread:    # other threads see plain torch
            return fn(*args, **kwargs)
        return tracer.create_proxy("call_function", fn, args, kwargs)
    wrapper.__name__ = name
    return wrapper


@dataclass
class Bound:
    """A forward call bound to its signature: parameter names in order, their values."""

    names: tuple[str, ...]
    values: tuple

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: v for n, v in zip(self.names, self.values) if isinstance(v, torch.Tensor)}


def bind(module: nn.Module, args: tuple, kwargs: dict) -> Bound:
    """Bind a call to ``forward``'s signature (defaults applied); raises TraceFailed for ``*args``/``**kw``."""
    sig = inspect.signature(_eager_forward(module))
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
    if isinstance(v, (tuple, list)):
        parts = tuple(_describe(x) for x in v)
        return None if None in parts else ("seq", type(v).__name__, parts)
    return None


def signature(module: nn.Module, bound: Bound) -> Optional[tuple]:
    """A hashable key for one specialised trace, or None when an argument cannot be keyed. The module's
    plain public attributes (``self.top_k = 4``) are part of it: the trace reads them as constants."""
    parts = tuple(_describe(v) for v in bound.values)
    if None in parts:
        return None
    attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))
    return (module.training, attrs, bound.names, parts)


@dataclass
class Traced:
    graph: fx.Graph
    root: nn.Module          # the shallow copy the graph's get_attr / call_module targets live on
    bound: Bound
    device: torch.device     # where the tensors live (node values are on ``meta``)


def trace(module: nn.Module, bound: Bound) -> Traced:
    """Trace ``module.forward`` specialised to ``bound`` (tensor arguments are placeholders with meta
    values, the others concrete). Raises TraceFailed with the reason."""
    root = copy.copy(module)
    root.__class__ = getattr(type(module), "_moec_base", type(module))   # trace the user's own forward
    tensors = bound.tensors()
    concrete = {n: v for n, v in zip(bound.names, bound.values) if n not in tensors}
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise TraceFailed(f"tensor arguments on several devices {sorted(map(str, devices))}")
    tracer = ValueTracer(dict(zip(bound.names, bound.values)), devices.pop() if devices else torch.device("cpu"))
    saved = {n: getattr(torch, n) for n in _FACTORIES if hasattr(torch, n)}
    thread = threading.get_ident()                 # the patches act on this thread only
    for n, fn in saved.items():
        setattr(torch, n, _factory_wrapper(tracer, n, fn, thread))
    setattr_ = nn.Module.__setattr__

    def no_state_changes(m, name, value):          # a graph cannot replay Python-side state updates
        if threading.get_ident() == thread and not tracer._computing \
                and not (m is root and name.startswith("_tensor_constant")):
            raise TraceFailed(f"forward assigns {type(m).__name__}.{name}: module state changes cannot be "
                              "replayed by a traced graph")
        setattr_(m, name, value)

    nn.Module.__setattr__ = no_state_changes
    try:
        graph = tracer.trace(root, concrete_args=concrete or None)
    except TraceFailed:
        raise
    except Exception as e:  # noqa: BLE001 - fx's own errors (control flow on a tensor value, ...)
        first = str(e).splitlines()[0] if str(e) else ""
        raise TraceFailed(f"{type(e).__name__}: {first}") from None
    finally:
        nn.Module.__setattr__ = setattr_
        for n, fn in saved.items():
            setattr(torch, n, fn)
    return Traced(graph, root, bound, tracer.device)
