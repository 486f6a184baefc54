"""A lifted layer's router when watchers hook it (transformers records router logits with forward hooks).

The compiled call runs the hooked router once, with the arguments the layer's forward gives it
(`moec.frontend.router_call`), so the hooks see its output; when a hook changed that output, the layer's
eager forward runs with the router replaying the hooked output (its hooks not run twice).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from .frontend.router_call import arguments


def call_observed(module, lifted, observed: list, x, x2):
    """Call the observed children (the router) that have forward hooks, once and with the arguments
    the forward gives them, so that the hooks see their outputs (transformers records router logits
    with hooks). None when every hook left the output as the router's own forward gives it; a
    context in which the eager forward gets that hooked output from the router (its hooks not run
    again); "cannot" when a hooked router's call cannot be repeated."""
    for path, sub in observed:
        if not (sub._forward_hooks or sub._forward_pre_hooks):
            continue
        call = lifted.observed_calls.get(path, ((("rows",),), {}))
        if call is None:
            return "cannot"
        args, kwargs = arguments(module, call, x, x2)
        hooked = sub(*args, **kwargs)
        with torch.no_grad():
            plain = sub.forward(*args, **kwargs)
        if not _same(hooked, plain):
            return _replaying(sub, x2, hooked)
    return None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(i, j) for i, j in zip(a, b))
    return type(a) is type(b) and a == b


@contextlib.contextmanager
def _replaying(sub, x2, out):
    """Inside: ``sub`` called on the rows ``x2`` gives ``out`` without running its hooks again."""
    hooks, pre = sub._forward_hooks, sub._forward_pre_hooks
    original = sub.forward

    def forward(*args, **kwargs):
        a = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(a, torch.Tensor) and a.numel() == x2.numel() and torch.equal(a.reshape(x2.shape), x2):
            return out
        return original(*args, **kwargs)

    sub._forward_hooks, sub._forward_pre_hooks = OrderedDict(), OrderedDict()
    sub.forward = forward
    try:
        yield
    finally:
        del sub.forward
        sub._forward_hooks, sub._forward_pre_hooks = hooks, pre

