"""MoBA registered as a transformers attention function, lifted: the way MoBA's own package installs it
(``ALL_ATTENTION_FUNCTIONS["moba"] = partial(moba_layer, ...)``, then ``attn_implementation="moba"``).

transformers' attention modules look their function up by the config's ``_attn_implementation`` and call
``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``; the modules' own
forwards never show the MoBA code. For a model `moec.compile` is given (`attach`):

- each attention module whose implementation names a registered function that looks like MoBA (its
  source, or the source of the functions it binds with ``functools.partial``, uses ``topk`` and a
  softmax or scaled_dot_product_attention) gets an `AttentionCall`: a module whose ``forward`` is that
  call, with the module bound, and a `moec.moba_region.MobaRegion` on it, analysed at its first call like
  any MoBA code (traced per call signature, matched, probed; the prefill's cores run the kernels, a
  decode step's code path without a core runs as written);
- the registry entry is replaced by a `Dispatch` holding the original: calls from those modules go to
  their region, any other caller (another model, an uncompiled copy) gets the original function.

A function registered again under the name afterwards (``ALL_ATTENTION_FUNCTIONS[name] = fn`` or
``AttentionInterface.register(name, fn)``, whichever registered it first) replaces the dispatch: the
modules then call the new function, eagerly.
"""
from __future__ import annotations

import functools
import inspect
import keyword
import types
import weakref
from typing import Callable, Optional

from torch import nn

from ..frontend.moba_candidates import sources_use_moba
from ..moba_region import MobaRegion
from ..region import being_traced

_CALLS: "weakref.WeakKeyDictionary[nn.Module, AttentionCall]" = weakref.WeakKeyDictionary()
_CLASSES: dict = {}


def _registry():
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except Exception:  # noqa: BLE001 - no transformers, or one without the interface
        return None
    return ALL_ATTENTION_FUNCTIONS


def _functions(fn) -> list:
    """``fn`` and, for a ``functools.partial``, the functions it binds (MoBA's package binds its kernel)."""
    if isinstance(fn, Dispatch):
        fn = fn.fn
    if isinstance(fn, functools.partial):
        bound = [a for a in (*fn.args, *fn.keywords.values()) if callable(a)]
        return _functions(fn.func) + [f for a in bound for f in _functions(a)]
    return [fn] if isinstance(fn, types.FunctionType) else []


@functools.lru_cache(maxsize=64)
def looks_like_moba(fn) -> bool:
    """Whether a registered attention function's code (and the code it binds or calls by name) uses
    ``topk`` and a softmax or ``scaled_dot_product_attention``."""
    return sources_use_moba(_functions(fn))


class AttentionCall(nn.Module):
    """One attention module's call of a registered function, as a module: ``forward(query, key, value,
    attention_mask, <the call's keyword arguments>)`` returns ``fn(module, query, key, ..., **keywords)``.
    Its class is made per set of keyword names (`call_class`), so the forward has named parameters to trace."""

    def __init__(self, fn: Callable, owner: nn.Module, name: str):
        super().__init__()
        self.__dict__["fn"] = fn                          # not submodules: the owner stays where it is
        self.__dict__["_owner"] = weakref.ref(owner)
        self.__dict__["implementation"] = name
        self.__dict__["region"] = None
        self.__dict__["keywords"] = None                  # the keyword names of the first call

    @property
    def owner(self) -> nn.Module:
        return self._owner()


def call_class(names: tuple) -> type:
    """An `AttentionCall` subclass whose ``forward`` takes the keyword arguments ``names`` by name."""
    if names not in _CLASSES:
        params = "".join(f", {n}" for n in names)
        passed = "".join(f", {n}={n}" for n in names)
        src = (f"def forward(self, query, key, value, attention_mask{params}):\n"
               f"    return self.fn(self.owner, query, key, value, attention_mask{passed})\n")
        scope: dict = {}
        exec(compile(src, f"<moec attention call {', '.join(names)}>", "exec"), scope)  # noqa: S102 - names checked
        _CLASSES[names] = type("AttentionCall", (AttentionCall,), {"forward": scope["forward"],
                                                                   "__module__": __name__})
    return _CLASSES[names]


class Dispatch:
    """Stands in the registry for ``fn``: a compiled model's attention modules run their region, every
    other caller runs ``fn``."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        if isinstance(fn, types.FunctionType):
            functools.update_wrapper(self, fn)

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        call = _CALLS.get(module) if isinstance(module, nn.Module) else None
        if call is None or call.fn is not self.fn or call.implementation != self.name or being_traced():
            return self.fn(module, query, key, value, attention_mask, *args, **kwargs)
        eager = functools.partial(self.fn, module)
        names = tuple(kwargs)
        if args or not all(n.isidentifier() and not keyword.iskeyword(n) for n in names):
            return call.region.eager("the attention call passes positional extras or unnamed keywords", eager,
                                     query, key, value, attention_mask, *args, **kwargs)
        if call.keywords is None:
            call.__dict__["keywords"] = names
            call.__class__ = call_class(names)
        if names != call.keywords:
            return call.region.eager(f"keyword arguments {names} differ from the first call's {call.keywords}", eager,
                                     query, key, value, attention_mask, **kwargs)

        def run_eager(query, key, value, attention_mask, **kw):
            return self.fn(module, query, key, value, attention_mask, **kw)
        return call.region(call, run_eager, query, key, value, attention_mask, **kwargs)


def attach(model: nn.Module, arch, dump_dir) -> list:
    """`AttentionCall` regions for the attention modules of ``model`` whose ``config._attn_implementation``
    names a registered MoBA-like function; ``[(qualname, description, region)]`` for the report."""
    registry = _registry()
    if registry is None:
        return []
    found = []
    for qualname, module in model.named_modules():
        name = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if not isinstance(name, str) or not _calls_registry(type(module)):
            continue
        local = name in registry._local_mapping
        fn = registry._local_mapping[name] if local else registry._global_mapping.get(name)
        if fn is None or not looks_like_moba(fn):
            continue
        if isinstance(fn, Dispatch):
            fn = fn.fn
        else:           # where it was registered, so that registering the name again replaces the dispatch
            (registry._local_mapping if local else type(registry)._global_mapping)[name] = Dispatch(name, fn)
        call = AttentionCall(fn, module, name)
        call.__dict__["region"] = MobaRegion((qualname.replace(".", "_") or "root") + "_attention_fn", arch=arch,
                                             dump_dir=dump_dir)
        _CALLS[module] = call
        found.append((qualname, f"{type(module).__name__} -> attention function {name!r}", call.region))
    return found


@functools.lru_cache(maxsize=256)
def _calls_registry(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention function up in transformers' registry."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def region_of(module: nn.Module) -> Optional[MobaRegion]:
    """The region of an attention module's registered-function calls (None when it has none)."""
    call = _CALLS.get(module)
    return call.region if call is not None else None


__all__ = ["attach", "looks_like_moba", "region_of", "AttentionCall", "Dispatch"]
