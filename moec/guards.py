"""Guards: what a lift relied on, recorded when it was made and checked at every call.

A lift reads a module tree once: its structure, its classes and forwards, the plain attributes its
code branches on (``top_k``, ``norm_topk_prob``, ``capacity_factor``, ``jitter_noise``...). `read`
records all of that as one hashable state: per module its path and identity, its class, a forward
set on the instance, its plain attributes (numbers, strings, booleans, None, tuples of them), the
tensors kept as plain attributes (by identity and address), and the dtype of each of its parameters and
buffers (``.half()``, a forward branching on a weight's dtype). A region compares the state at every
call with the one its lift was made for; when they differ the region lifts again for the new state
(or runs eager, with the reason), and `changes` says what changed for ``explain()``.

Reading the whole state at every call would cost more than a decode step's kernels, so a `Guard`
keeps, for the state it was built from, the exact objects to look at: each module's attribute dict
with the values of its plain attributes and tensors, each container's child table, each class. Its
`holds` check compares those (identity first, a few dozen reads for a layer of eight experts) and
says whether the full state can differ; only then is it read again.

What a call must not have, whatever the state, `Guard.call_checks` reports: forward hooks or
pre-hooks on modules inside the region (its kernels replace those modules' forwards, so the hooks would
not run: the region runs eager; hooks on the region's own module run around it as usual), and
submodules in another training mode than the region's.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn.modules import module as nn_module

_PLAIN = (bool, int, float, str, type(None), complex)
# attributes that say nothing about what a forward computes: the training flag (checked per call),
# and the mark torch.compile leaves on a module it wraps
_BOOKKEEPING = {"training", "_is_torch_compile"}


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(_plain(i) for i in v))


def _attributes(d: dict) -> tuple[list, list]:
    attrs, tensors = [], []
    for k, v in d.items():
        if k in _BOOKKEEPING or k.startswith("_moec"):
            continue
        if _plain(v):
            attrs.append((k, v))
        elif isinstance(v, torch.Tensor):
            tensors.append((k, v))
    return attrs, tensors


def _address(t: torch.Tensor) -> int:
    return t.data_ptr() if t.device.type != "meta" else 0


def _base(m: nn.Module) -> type:
    """The module's class (the one `moec.compile` subclassed, for a compiled module)."""
    return getattr(type(m), "_moec_base", type(m))


def _held(m: nn.Module) -> list:
    """``(table, name)`` of the module's own parameters and buffers (the dicts they are kept in)."""
    return [(table, k) for table in (m._parameters, m._buffers) for k, t in table.items() if t is not None]


def _kind(t):
    return t.dtype if isinstance(t, torch.Tensor) else None


def _entry(path: str, m: nn.Module) -> tuple:
    d = m.__dict__
    attrs, tensors = _attributes(d)
    forward = d.get("forward")
    return (path, id(m), _base(m), id(forward) if forward is not None else None,
            tuple(sorted(attrs, key=lambda kv: kv[0])), tuple((k, id(t), _address(t)) for k, t in tensors),
            tuple((k, _kind(table[k])) for table, k in _held(m)))


def read(module: nn.Module) -> tuple:
    """The state of ``module``'s tree (see the module docstring): hashable, equal when no lift could differ."""
    return tuple(_entry(path, m) for path, m in module.named_modules())


class Guard:
    """The objects `read`'s state came from, checked cheaply (`holds`), and the tree's modules (for the
    per-call checks). Each check is one C-level pass (``map``) over flat tuples built here: a layer of
    eight ModuleList experts has some forty modules, and this runs at every call."""

    def __init__(self, module: nn.Module):
        self.modules = tuple(m for _, m in module.named_modules())
        self.root = module
        self._paths = [p for p, _ in module.named_modules()]
        self._dicts = tuple(m.__dict__ for m in self.modules)
        self._lens = tuple(map(len, self._dicts))
        self._classes = tuple(map(type, self.modules))
        self._children = tuple(dict(m._modules) for m in self.modules)
        attr_at, tensor_at = [], []
        for d in self._dicts:
            attrs, tensors = _attributes(d)
            attr_at += [(d, k, v) for k, v in attrs]
            tensor_at += [(d, k, t) for k, t in tensors]
        self._attr_dicts, self._attr_keys, self._attr_values = (tuple(c) for c in zip(*attr_at)) if attr_at else ((),) * 3
        self._tensor_dicts, self._tensor_keys, self._tensors = (tuple(c) for c in zip(*tensor_at)) if tensor_at else ((),) * 3
        self._addresses = tuple(map(_address, self._tensors))
        held = [pair for m in self.modules for pair in _held(m)]
        self._held_tables, self._held_keys = (tuple(c) for c in zip(*held)) if held else ((), ())
        self._held_dtypes = tuple(map(_kind, map(dict.get, self._held_tables, self._held_keys)))
        self._missing = (_MISSING,) * len(self._attr_keys)     # a deleted attribute is not a None one
        self._inner = self.modules[1:]

    def holds(self) -> bool:
        """False when the state may have changed since the guard was built (then `read` says how)."""
        if tuple(map(len, self._dicts)) != self._lens or tuple(map(type, self.modules)) != self._classes:
            return False                    # (exact: a class swap is checked by `read`)
        # plain attributes: the same object, or equal (tuple comparison tries identity first)
        if tuple(map(dict.get, self._attr_dicts, self._attr_keys, self._missing)) != self._attr_values:
            return False
        if self._tensors and not (all(map(operator.is_, map(dict.get, self._tensor_dicts, self._tensor_keys),
                                          self._tensors))
                                  and tuple(map(_address, self._tensors)) == self._addresses):
            return False
        try:                                # (C-level: a parameter set to None has no dtype)
            if tuple(map(_DTYPE, map(dict.get, self._held_tables, self._held_keys))) != self._held_dtypes:
                return False                # a parameter or buffer of another dtype
        except AttributeError:
            return False
        return tuple(map(_MODULES, self.modules)) == self._children

    def call_checks(self) -> tuple[list, bool]:
        """``(hooked, mixed_training)``: paths of hooked modules inside the region (not its own module;
        ``"*"`` for global hooks), and whether a submodule is in another training mode than the root."""
        hooked = ["*"] if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks else []
        inner = self._inner
        if any(map(_HOOKS, inner)) or any(map(_PRE_HOOKS, inner)):
            hooked += [p for p, m in zip(self._paths[1:], inner) if m._forward_hooks or m._forward_pre_hooks]
        return hooked, bool(inner) and set(map(_TRAINING, inner)) != {self.root.training}


_MODULES = operator.attrgetter("_modules")
_DTYPE = operator.attrgetter("dtype")
_HOOKS = operator.attrgetter("_forward_hooks")
_PRE_HOOKS = operator.attrgetter("_forward_pre_hooks")
_TRAINING = operator.attrgetter("training")


_MISSING = object()


def changes(before: tuple, after: tuple, limit: int = 3) -> str:
    """What differs between two states, in words (the first ``limit`` differences)."""
    old = {e[0]: e for e in before}
    new = {e[0]: e for e in after}
    said = [f"{p or '<root>'} added" for p in new if p not in old]
    said += [f"{p or '<root>'} removed" for p in old if p not in new]
    for p in (p for p in new if p in old and old[p] != new[p]):
        a, b = old[p], new[p]
        where = f"{p + '.' if p else ''}"
        if a[1] != b[1] or a[2] != b[2]:
            said.append(f"{p or '<root>'} replaced ({b[2].__name__})")
            continue
        if a[3] != b[3]:
            said.append(f"{where}forward set on the instance")
        va, vb = dict(a[4]), dict(b[4])
        said += [f"{where}{k}: {va.get(k, '(unset)')!r} -> {vb.get(k, '(unset)')!r}"
                 for k in sorted(set(va) | set(vb)) if va.get(k, _MISSING) != vb.get(k, _MISSING)]
        ta, tb = {t[0]: t[1:] for t in a[5]}, {t[0]: t[1:] for t in b[5]}
        said += [f"{where}{k} (a tensor attribute) replaced" for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)]
        ka, kb = dict(a[6]), dict(b[6])
        said += [f"{where}{k}: {_kind_text(ka.get(k))} -> {_kind_text(kb.get(k))}" for k in ka if k in kb
                 and ka[k] != kb[k]]
    more = f" (and {len(said) - limit} more)" if len(said) > limit else ""
    return "; ".join(said[:limit]) + more if said else "nothing"


def _kind_text(kind) -> str:
    return "(none)" if kind is None else str(kind).replace("torch.", "")
