"""How a layer's forward calls its router, so the compiled call can call it the same way.

Routers that watchers hook (transformers records router logits with forward hooks) are called once by
a compiled layer so the hooks see their output (`moec.moe_region`). Most routers take the hidden
states alone; some also take a tensor the layer owns (``router(x, self.e_score_correction_bias)``).
`router_calls` runs the layer's forward up to its router's call (then stops it: nothing after it
runs) and reads each argument as the rows of the input, the input itself, a tensor of the layer's
state (by name, so a replaced tensor is read afresh) or a constant.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch
from torch import nn

from .probe_harness import run_watched
from .token_table import probe_tokens

# an argument: ("rows",) the input as [T, d]; ("input",) the input as given; ("state", name) a tensor
# of the layer found by its qualified name; ("const", value)
Arg = tuple
Call = Optional[tuple]          # (positional Args, {keyword: Arg}); None: not replayable


class _Stop(Exception):
    pass


def _needs_more_than_input(router: nn.Module) -> bool:
    """Whether ``router``'s forward can take more than the hidden states (optional arguments too: the
    layer may pass them, ``self.gate(x, return_probs=True)``)."""
    try:
        params = list(inspect.signature(router.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    return len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _state_names(module: nn.Module) -> dict:
    names = {}
    for q, m in module.named_modules():
        for k, v in m.__dict__.items():
            if isinstance(v, torch.Tensor):
                names.setdefault(id(v), f"{q}.{k}" if q else k)
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            if v is not None:
                names.setdefault(id(v), f"{q}.{k}" if q else k)
    return names


def _read(value, x: torch.Tensor, names: dict) -> Optional[Arg]:
    if isinstance(value, torch.Tensor):
        if id(value) in names:
            return ("state", names[id(value)])
        if value.numel() == x.numel() and torch.equal(value.reshape(x.shape), x):
            return ("input",) if value.shape == x.shape else ("rows",) if value.dim() == 2 else None
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("const", value)
    return None


@contextlib.contextmanager
def _spied(child: nn.Module, spy):
    """``child``'s forward replaced by ``spy`` (given the forward it replaces), restored after."""
    had, own = "forward" in child.__dict__, child.__dict__.get("forward")
    child.forward = functools.partial(spy, own if had else functools.partial(type(child).forward, child))
    try:
        yield
    finally:
        if had:
            child.forward = own
        else:
            del child.forward


def own_forward(module: nn.Module):
    """The forward of ``module``'s own class (the one moec's compile wraps, when it did)."""
    return (getattr(type(module), "_moec_base", None) or type(module)).forward


def _read_call(args, kwargs, x: torch.Tensor, names: dict, read=_read) -> Call:
    """The `Call` of a recorded call (each argument by ``read``), or None when an argument is not repeatable."""
    got_args = [read(a, x, names) for a in args]
    got_kwargs = {k: read(v, x, names) for k, v in kwargs.items()}
    if any(a is None for a in got_args) or any(v is None for v in got_kwargs.values()):
        return None
    return tuple(got_args), got_kwargs


def _record(module: nn.Module, path: str, x: torch.Tensor, kwargs: Optional[dict] = None) -> Call:
    seen = []

    def spy(inner, *args, **kwargs):
        seen.append((args, kwargs))
        raise _Stop

    try:
        with _spied(module.get_submodule(path), spy), torch.no_grad(), torch.random.fork_rng(devices=[]):
            own_forward(module)(module, x, **(kwargs or {}))
    except _Stop:
        pass
    except Exception:       # noqa: BLE001 - the forward failed before its router: not replayable
        return None
    if not seen:
        return None
    args, kwargs = seen[0]
    return _read_call(args, kwargs, x, _state_names(module))


def router_calls(module: nn.Module, paths: tuple, hidden: int, tokens=None) -> dict:
    """``{path: Call}`` for each observed router of ``module`` that takes more than the hidden
    states (the others are called as ``router(rows)``); ``tokens``: the forward's token-id argument
    (`moec.frontend.token_table.TokenIds`), given random ids."""
    calls = {}
    for path in paths:
        if not _needs_more_than_input(module.get_submodule(path)):
            continue
        dtype = next((p.dtype for p in module.get_submodule(path).parameters()), torch.float32)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        call = None
        for shape in ((1, 4, hidden), (4, hidden)):
            kwargs = {tokens.arg: probe_tokens(shape[:-1], tokens.vocab, 5, device)} if tokens is not None else {}
            call = _record(module, path, torch.randn(shape, dtype=dtype, device=device), kwargs)
            if call is not None:
                break
        calls[path] = call
    return calls


def arguments(module: nn.Module, call: tuple, x: torch.Tensor, rows: torch.Tensor) -> tuple:
    """The arguments ``call`` names, for a call of ``module`` on ``x`` (``rows``: x as [T, d])."""
    def value(a: Arg):
        if a[0] == "rows":
            return rows
        if a[0] == "input":
            return x
        if a[0] == "state":
            owner, _, name = a[1].rpartition(".")
            return getattr(module.get_submodule(owner) if owner else module, name)
        return a[1]
    args, kwargs = call
    return tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()}


def external_call(module: nn.Module, path: str, x: torch.Tensor, training: bool, device) -> tuple[Call, str]:
    """How the forward calls its child at ``path`` (an external router or shared expert, which the compiled layer
    calls the same way): ``(call, "")``, or ``(None, why not)`` when the forward does not call it exactly once,
    calls it without autograd or on a detached input (the compiled call's gradients would differ), or with an
    argument moec cannot repeat. One run of the forward on ``x`` in ``training`` mode, on copies, hooks off,
    the module left as found (`moec.frontend.probe_harness.run_watched`)."""
    seen, given = [], []

    def spy(inner, *args, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        # an argument is the input (or its rows) only when it is a view of it: a tensor computed from it that
        # happens to equal it here (x times a scale of ones) is not
        base = given[0].untyped_storage().data_ptr() if given else None
        views = {id(t) for t in tensors if t.untyped_storage().data_ptr() == base}
        seen.append((args, kwargs, torch.is_grad_enabled() and any(t.requires_grad for t in tensors), views))
        return inner(*args, **kwargs)

    def forward(xc):
        given.append(xc)
        with torch.enable_grad():
            return own_forward(module)(module, xc.requires_grad_(True) if xc.is_leaf else xc)

    try:
        with _spied(module.get_submodule(path), spy):
            run_watched(forward, (x.detach(),), module, training, device, 7)
    except Exception as e:  # noqa: BLE001 - the forward failed: no call to repeat
        return None, f"the forward fails on a made-up input ({type(e).__name__})"
    if len(seen) != 1:
        return None, f"the forward calls {path} {len(seen)} times, not once"
    args, kwargs, tracked, views = seen[0]
    if not tracked:
        return None, f"the forward calls {path} without gradients to its input (detached or under no_grad)"
    def read(a, x, names):
        got = _read(a, x, names)
        return None if got in (("rows",), ("input",)) and id(a) not in views else got
    call = _read_call(args, kwargs, x, _state_names(module), read)
    return (call, "") if call is not None else (None, f"the forward calls {path} with arguments moec cannot repeat")


class ProbedModule:
    """A child the compiled layer calls as the forward does (an external router or shared expert,
    `moec.spec.MoEWeights.router` / ``shared``), as the probe calls it: with the arguments the forward passes
    (``call``, `external_call`: the input shaped as given, or its rows, tensors of the layer) for a call on an
    input of ``shape``, by `run_watched` in ``training`` mode with the RNG seeded with ``seed`` (as the probe's
    eager run of that input is), so the lift leaves the module as it found it and a router drawing random
    numbers first in the forward draws what eager drew. Called on rows ``[T, d]``; returns ``[T, -1]``."""

    def __init__(self, layer: nn.Module, path: str, call: tuple, training: bool, seed: int, shape=None):
        self.layer, self.path, self.call = layer, path, call
        self.training, self.seed, self.shape = training, seed, shape

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        child = self.layer.get_submodule(self.path)
        x = rows.reshape(self.shape) if self.shape is not None and rows.numel() else rows
        args, kwargs = arguments(self.layer, self.call, x, rows)
        out, _ = run_watched(lambda *a: child(*a, **kwargs), args, child, self.training, rows.device, self.seed)
        return out.reshape(rows.shape[0], -1)

    def at(self, training: bool, seed: int, shape=None) -> "ProbedModule":
        """The same child called in ``training`` mode with ``seed``, for an input of ``shape``."""
        return ProbedModule(self.layer, self.path, self.call, training, seed, shape)
