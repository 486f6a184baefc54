"""Guards: what a lift relied on, recorded when it was made and checked at every call.

A lift reads a module tree once: its structure, its classes and forwards, the plain attributes its
code branches on (``top_k``, ``norm_topk_prob``, ``capacity_factor``, ``jitter_noise``...). `read`
records all of that as one hashable state: per module its path and identity, its class, a forward
set on the instance, its plain attributes (numbers, strings, booleans, None, tuples of them), the
tensors kept as plain attributes (by identity and address). A region compares the state at every
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


def _entry(path: str, m: nn.Module) -> tuple:
    d = m.__dict__
    attrs, tensors = _attributes(d)
    forward = d.get("forward")
    return (path, id(m), _base(m), id(forward) if forward is not None else None,
            tuple(sorted(attrs, key=lambda kv: kv[0])), tuple((k, id(t), _address(t)) for k, t in tensors))


def read(module: nn.Module) -> tuple:
    """The state of ``module``'s tree (see the module docstring): hashable, equal when no lift could differ."""
    return tuple(_entry(path, m) for path, m in module.named_modules())


class Guard:
    """The objects `read`'s state came from, checked cheaply (`holds`), and the tree's modules (for the
    per-call checks)."""

    def __init__(self, module: nn.Module):
        self.modules = [m for _, m in module.named_modules()]
        self.root = module
        self._dicts = []
        for m in self.modules:
            d = m.__dict__
            attrs, tensors = _attributes(d)
            self._dicts.append((m, d, len(d), type(m), attrs, [(k, t, _address(t)) for k, t in tensors],
                                dict(m._modules)))

    def holds(self) -> bool:
        """False when the state may have changed since the guard was built (then `read` says how)."""
        for m, d, n, cls, attrs, tensors, children in self._dicts:
            if len(d) != n or type(m) is not cls:      # (exact: a class swap is checked by `read`)
                return False
            for k, v in attrs:
                got = d.get(k, _MISSING)
                if got is not v and got != v:
                    return False
            for k, t, address in tensors:
                got = d.get(k)
                if got is not t or _address(t) != address:
                    return False
            if m._modules != children:
                return False
        return True

    def call_checks(self) -> tuple[list, bool]:
        """``(hooked, mixed_training)``: paths of hooked modules inside the region (not its own module;
        ``"*"`` for global hooks), and whether a submodule is in another training mode than the root."""
        hooked = ["*"] if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks else []
        mode, mixed = self.root.training, False
        for m in self.modules[1:]:
            if m._forward_hooks or m._forward_pre_hooks:
                hooked.append(next(p for p, s in self.root.named_modules() if s is m))
            mixed |= m.training != mode
        return hooked, mixed


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
    more = f" (and {len(said) - limit} more)" if len(said) > limit else ""
    return "; ".join(said[:limit]) + more if said else "nothing"
