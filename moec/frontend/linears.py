"""What counts as a linear layer: an ``nn.Linear``, or any module whose only state is ``weight`` (and
``bias``) and that computes ``F.linear(x, self.weight, self.bias)`` — a repository's own ``Linear``
class, a quantisation-ready wrapper holding a float weight — checked by calling it once on random rows
(remembered per module until its class or forward changes). A module with more state (a LoRA
adapter, a scale) is none: its output depends on what one call cannot pin down."""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Linear(NamedTuple):
    in_features: int
    out_features: int
    bias: Optional[torch.Tensor]


def _computes_linear(m: nn.Module, w: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(5)).to(w.dtype).to(w.device)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y = m.forward(x)
    except Exception:  # noqa: BLE001 - a module that cannot run on rows is no linear
        return False
    if not isinstance(y, torch.Tensor) or y.shape != (3, w.shape[0]) or y.dtype != w.dtype:
        return False
    ref = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    return bool(torch.allclose(y.float(), ref, rtol=1e-3, atol=1e-3 * (1 + ref.abs().max().item())))


def as_linear(m: nn.Module) -> Optional[Linear]:
    """``(in_features, out_features, bias)`` of ``m`` if it is a linear layer, else None."""
    if isinstance(m, nn.Linear):
        return Linear(m.in_features, m.out_features, m.bias)
    w, b = m._parameters.get("weight"), m._parameters.get("bias")
    if w is None or w.dim() != 2 or not w.is_floating_point() or w.is_meta or next(m.children(), None) is not None:
        return None
    others = [k for k, v in m._parameters.items() if v is not None and k not in ("weight", "bias")]
    if others or any(v is not None for v in m._buffers.values()) or \
            any(isinstance(v, torch.Tensor) for v in m.__dict__.values()):
        return None          # more state than a linear's (a LoRA adapter, a scale): not one
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
        return None
    stamp = (type(m), m.__dict__.get("forward"), w.shape, b is None)
    got = _CHECKED.get(m)
    if got is None or got[0] != stamp:
        got = (stamp, _computes_linear(m, w, b))
        _CHECKED[m] = got
    return Linear(w.shape[1], w.shape[0], b) if got[1] else None


def linears(m: nn.Module) -> list:
    """``[(name, module, Linear)]`` for the linear layers in ``m`` (itself included)."""
    return [(n, x, lin) for n, x in m.named_modules() for lin in [as_linear(x)] if lin is not None]
