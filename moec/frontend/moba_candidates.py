"""Which modules (and registered attention functions) may hold a MoBA core: a cheap look at their source
(`looks_like_moba`: ``topk`` and a softmax or ``scaled_dot_product_attention``), the candidates of a model
(`find_moba_modules`), and made-up inputs to analyse one at compile time (`synthesize_args`). What a
candidate computes is `moec.frontend.moba_lift`'s to find out.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

from torch import nn

from .probe_harness import draw
from .trace import eager_forward



def _sources(fn, depth: int = 3, seen=None) -> list[str]:
    """The source of ``fn`` and of the Python functions it reaches by global name (a few levels)."""
    seen = set() if seen is None else seen
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType) or fn in seen:
        return []
    seen.add(fn)
    try:
        out = [inspect.getsource(fn)]
    except (OSError, TypeError):
        out = []
    if depth:
        names = set(fn.__code__.co_names)
        for const in fn.__code__.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        for name in names:
            obj = fn.__globals__.get(name)
            objs = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]
            for o in objs:
                out += _sources(o, depth - 1, seen)
    return out


def looks_like_moba(module: nn.Module) -> bool:
    """A cheap pre-filter: the class's ``forward`` (its user-defined bases' too), or a method or a
    global function it calls by name, uses both ``topk`` and a softmax / ``scaled_dot_product_attention``."""
    return _looks_like_moba(getattr(type(module), "_moec_base", type(module)))


@functools.lru_cache(maxsize=1024)
def _looks_like_moba(cls: type) -> bool:
    seen: set = set()
    text = []
    for c in cls.__mro__:
        fwd = vars(c).get("forward")
        if c.__module__.startswith("torch") or not isinstance(fwd, types.FunctionType):
            continue
        text += _sources(fwd, seen=seen)
        for name in fwd.__code__.co_names:                 # self.helper(...): methods of the class
            meth = getattr(cls, name, None)
            if isinstance(meth, types.FunctionType) and not meth.__module__.startswith("torch"):
                text += _sources(meth, seen=seen)
    return _uses_moba("\n".join(text))


def sources_use_moba(fns) -> bool:
    """`looks_like_moba` for functions (a registered attention function and what it binds)."""
    seen: set = set()
    return _uses_moba("\n".join(t for fn in fns for t in _sources(fn, seen=seen)))


def _uses_moba(src: str) -> bool:
    return "topk" in src and ("softmax" in src or "scaled_dot_product_attention" in src)


def find_moba_modules(model: nn.Module, exclude=()) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, module)]`` of user-defined modules that look like MoBA (`looks_like_moba`),
    neither in ``exclude`` (the MoE candidates) or below one, nor holding one (a model around MoE
    layers is not a MoBA core; its attention modules are visited)."""
    skip = {id(m) for m in exclude}
    paths = [p for p, m in model.named_modules() if id(m) in skip]
    holders = {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)} | ({""} if paths else set())
    out = []

    def visit(prefix, m):
        if id(m) in skip:
            return
        if prefix not in holders and not type(m).__module__.startswith("torch.") and looks_like_moba(m):
            out.append((prefix, m))
        for name, child in m.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out


def synthesize_args(module: nn.Module, n: int = 37) -> Optional[tuple]:
    """``(x,)`` with ``x [2, n, d]`` when forward takes one required argument and the module's first
    ``nn.Linear`` reads ``d`` features; else None (the first call will be the example)."""
    params = [p for p in inspect.signature(eager_forward(module)).parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    lin = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    if len(params) != 1 or lin is None:
        return None
    w = lin.weight
    return (draw((2, n, lin.in_features), 0, w.dtype, w.device),)
