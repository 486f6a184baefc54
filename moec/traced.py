"""A compiled MoE layer as `torch.compile` sees it: one custom op, ``torch.ops.moec.layer``.

Dynamo traces a compiled layer's forward as far as this module's `forward_for_dynamo`, which
reads what the lift relied on (the plain attributes of the layer's modules, its training flag; dynamo
guards each value it read, so a change traces again) and then calls one opaque op with the input and
the layer's parameters. The op's implementation is the layer's usual call (`moec.moe_region`:
its own guards, kernels or the eager forward, hooks), so the answer is the eager one whatever
dynamo's guards did not see; its fake implementation gives the outputs' shapes from the lift. The
whole model can therefore be compiled with ``fullgraph=True`` where the rest of it allows.

Gradients: when the traced call needs them, the op runs the layer with autograd on (as an eager
call would: the kernels' forward and the reference's backward, or the eager forward) and keeps
that graph until ``torch.ops.moec.layer_backward`` consumes it, so nothing is recomputed (no
second call of hooks, no second random draw). The graph is dropped with the op's token output
when autograd frees it.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .frontend.outputs import item_dtype, item_shape, pack, slots

_LAYERS: dict = {}            # handle -> weakref to a compiled module
_CONTAINERS: dict = {}        # handle -> the class a layer's outputs come in (a namedtuple's)
_PENDING: dict = {}           # token -> (outputs with their graph, the leaves they were computed from)
_tokens = itertools.count(1)
_MISSING = object()
planning = False              # inside `_plan` (trace time): module calls run as in eager
_traced_any = False           # torch.compile has traced a layer (see `release_freed`)


def handle(module: nn.Module) -> int:
    """A number naming ``module`` to the op (ops take no Python objects). Dynamo guards the number, so
    the smallest free one is given: a model built again after the last one was freed (a notebook
    cell run twice, a loop over runs; see `release_freed`) reuses the graph torch.compile traced for it."""
    h = module.__dict__.get("_moec_handle")
    if h is None or _LAYERS.get(h, lambda: None)() is not module:
        h = next(i for i in itertools.count(1) if i not in _LAYERS)
        module.__dict__["_moec_handle"] = h
        _LAYERS[h] = weakref.ref(module, lambda _, h=h: _LAYERS.pop(h, None))
    return h


def release_freed() -> None:
    """Free the numbers of compiled layers no one holds any more (lifting leaves reference cycles, so
    a dropped model waits for the cycle collector); called once per `moec.compile`, not per layer,
    and only once torch.compile has traced a layer (only its graphs hold numbers)."""
    if _LAYERS and _traced_any:
        gc.collect()


def _module(h: int) -> nn.Module:
    module = _LAYERS.get(h, lambda: None)()
    if module is None:
        raise RuntimeError(f"moec layer #{h} no longer exists (a graph traced through it outlived it)")
    return module


def _out_meta(module: nn.Module, x: Tensor) -> list[tuple]:
    """``(shape, dtype)`` of each tensor the layer returns for ``x`` (its lift's outputs; items that
    are None are left out: an op returns tensors)."""
    lifted = module.__dict__["_moec_region"].lifted
    T, spec = x.numel() // x.shape[-1], lifted.spec
    k, E = spec.router.top_k, spec.num_experts
    shapes = {"y": (T, x.shape[-1]) if lifted.y_flat else tuple(x.shape), "logits": (T, E), "weights": (T, k),
              "ids": (T, k), "aux": (), "zloss": (), "counts": (E,)}
    kinds = slots(lifted.outputs)
    rules = lifted.out_dtypes or ("x",) * len(kinds)
    lead = lifted.out_leads or (False,) * len(kinds)
    return [(item_shape(shapes[kind], lead[i] and kind != "y", x.shape), item_dtype(rule, x.dtype))
            for i, (kind, rule) in enumerate(zip(kinds, rules)) if kind != "none"]


def _call(module: nn.Module, x: Tensor):
    region = module.__dict__["_moec_region"]
    base = type(module)._moec_base
    return region(module, functools.partial(base.forward, module), x)


def _conform(outs, meta: list, module: nn.Module) -> list:
    flat = [o for o in outs if o is not None] if isinstance(outs, (tuple, list)) else [outs]
    if len(flat) != len(meta) or any(not isinstance(o, Tensor) or tuple(o.shape) != s for o, (s, _) in zip(flat, meta)):
        raise RuntimeError(
            f"moec: {type(module).__name__}'s outputs changed in a way the torch.compile graph did not guard "
            f"(now {[tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in flat]}); "
            f"call torch._dynamo.reset() to trace it again")
    return [o.to(dtype) if o.dtype != dtype else o for o, (_, dtype) in zip(flat, meta)]


def _fresh(o: Tensor, inputs: list) -> Tensor:
    """``o`` unless it shares memory with an input (an op's outputs may not alias its inputs)."""
    ptr = o.untyped_storage().data_ptr()
    return o.clone() if any(t.untyped_storage().data_ptr() == ptr for t in inputs) else o


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside an op's implementation (which runs below autograd): the layer's call records
    its graph as an eager call would."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "ADInplaceOrView", "AutogradOther", "AutogradNestedTensor"):
        exclude = exclude.remove(getattr(C.DispatchKey, key))
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("moec::layer", mutates_args=())
def layer(x: Tensor, tensors: list[Tensor], handle: int, grad: bool) -> list[Tensor]:
    """A compiled layer's call (see the module docstring); the last output is a token for the backward."""
    module = _module(handle)
    meta = _out_meta(module, x)
    if not grad:
        with torch.no_grad():
            outs = _conform(_call(module, x), meta, module)
        return [_fresh(o, [x, *tensors]) for o in outs] + [torch.zeros((), dtype=torch.int64)]
    leaf = x.detach().requires_grad_()
    with _autograd_on():
        outs = _conform(_call(module, leaf), meta, module)
    key = next(_tokens)
    token = torch.full((), key, dtype=torch.int64)
    _PENDING[key] = (outs, [leaf, *module.parameters()])
    weakref.finalize(token, _PENDING.pop, key, None)
    return [_fresh(o.detach(), [x, *tensors]) for o in outs] + [token]


@layer.register_fake
def _layer_fake(x, tensors, handle, grad):
    meta = _out_meta(_module(handle), x)
    return [x.new_empty(shape, dtype=dtype) for shape, dtype in meta] + [torch.empty((), dtype=torch.int64)]


@torch.library.custom_op("moec::layer_backward", mutates_args=())
def layer_backward(token: Tensor, grads: list[Optional[Tensor]], x: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Gradients of one `layer` call for ``x`` and ``tensors`` from its kept graph."""
    got = _PENDING.get(int(token))
    if got is None:
        raise RuntimeError("moec: the graph of this layer call was already freed (backward through it twice "
                           "needs retain_graph=True on the first)")
    outs, leaves = got
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    with _autograd_on():
        found = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True) \
            if pairs else [None] * len(leaves)
    return [g.clone() if g is not None else torch.zeros_like(t) for g, t in zip(found, [x, *tensors])]


@layer_backward.register_fake
def _layer_backward_fake(token, grads, x, tensors):
    return [torch.empty_like(x)] + [torch.empty_like(t) for t in tensors]


def _setup(ctx, inputs, output):
    x, tensors, _, _ = inputs
    ctx.save_for_backward(output[-1], x, *tensors)


def _backward(ctx, grads):
    token, x, *tensors = ctx.saved_tensors
    got = torch.ops.moec.layer_backward(token, list(grads[:-1]), x, tensors)
    return got[0], got[1:], None, None


layer.register_autograd(_backward, setup_context=_setup)


@torch.compiler.assume_constant_result
def _plan(h: int) -> tuple:
    """Run at trace time: bring the layer's lift up to date (its guards) and say what the traced code
    must check: ``((path, attribute, value) ..., modes that run eager, output kinds, container)``, or ``()``
    when the layer is not lifted in its current state."""
    global planning, _traced_any
    _traced_any = True
    module = _module(h)
    region = module.__dict__["_moec_region"]
    planning, before = True, planning        # a lift's probe calls modules: as in eager, not traced
    try:
        region.guard(module)
    finally:
        planning = before
    if region.lifted is None:
        return ()
    attributes = tuple((path, k, v) for path, _, _, _, attrs, *_ in region.state for k, v in attrs)
    container = region.lifted.container
    _CONTAINERS[h] = container                       # a class is no constant result: read by handle
    kind = None if container is None else "list" if container is list else "tuple" if container is tuple else "class"
    return attributes, tuple(region.lifted.eager_in), slots(region.lifted.outputs), kind


def forward_for_dynamo(module: nn.Module, x: Tensor, eager):
    """What dynamo traces for a compiled MoE layer called as ``forward(x)`` (see the module docstring)."""
    h = module.__dict__["_moec_handle"]          # given by `handle` when the layer was compiled
    plan = _plan(h)
    if not plan or module.training in plan[1] or not x.is_floating_point():
        return eager(x)
    attributes, _, kinds, container = plan
    for path, name, value in attributes:          # dynamo guards each value it compares
        if getattr(module.get_submodule(path) if path else module, name, _MISSING) != value:
            return eager(x)
    tensors = list(module.parameters())
    grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))
    outs = torch.ops.moec.layer(x, tensors, h, grad)
    tensors = iter(outs)
    items = [None if kind == "none" else next(tensors) for kind in kinds]
    cls = _CONTAINERS[h] if container == "class" else {None: None, "tuple": tuple, "list": list}[container]
    return pack(items, cls)
