"""What a lifted layer's forward returns, item by item.

A forward returns ``y`` alone, or a tuple / list / namedtuple whose first item is ``y`` and whose
other items each are one of these kinds (the lift's ``outputs`` names them joined by ``_``:
``"y_logits"``, ``"y_aux_zloss"``):

- ``logits``: the router logits ``[T, E]``;      ``weights``: the routing weights ``[T, k]``;
- ``aux``: the load-balancing loss (a scalar);    ``zloss``: the router z-loss, the mean over tokens
  of ``logsumexp(logits)**2`` (a scalar);
- ``ids``: the chosen experts ``[T, k]``;          ``counts``: tokens per expert ``[E]``;
- ``none``: ``None``.

The kernels produce ``y``, ``logits``, ``weights`` and ``aux``; the others are derived on the host
from the router logits (a ``[T, E]`` computation) by `derive`, the same function the probe checks.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..spec import RouterConfig

KERNEL_KINDS = ("y", "logits", "aux", "weights")          # the others are derived on the host


def slots(outputs: str) -> tuple:
    return tuple(outputs.split("_"))


def kernel_outputs(outputs: str, external_router: bool = False) -> tuple:
    """The program's outputs for ``outputs``: its kernel kinds, and the logits the host kinds need (an
    external router's logits are its own output, never the program's)."""
    s = slots(outputs)
    ks = [k for k in s if k in KERNEL_KINDS]
    if any(k in ("zloss", "ids", "counts") for k in s) and "logits" not in ks:
        ks.append("logits")
    return tuple(k for k in ks if not (external_router and k == "logits"))


def kinds_of(value, T: int, E: int, lead: tuple = ()) -> list:
    """The kinds a returned item (not the first) may be, judged by type, dtype and shape (a per-token item
    may keep the input's leading dims ``lead``: router logits ``[B, S, E]``, see `leads`)."""
    if value is None:
        return ["none"]
    if not isinstance(value, torch.Tensor):
        return []
    if leads(value, lead):
        value = value.reshape(T, value.shape[-1])
    if value.is_floating_point():
        if value.dim() == 0:
            return ["aux", "zloss"]
        if tuple(value.shape) == (T, E):
            return ["logits"]
        if value.dim() == 2 and value.shape[0] == T and value.shape[1] < E:
            return ["weights"]
    elif value.dim() == 2 and value.shape[0] == T and value.shape[1] < E:
        return ["ids"]
    if tuple(value.shape) == (E,):
        return ["counts"]
    return []


def leads(value, lead: tuple) -> bool:
    """Whether a per-token item keeps the input's leading dims ``lead`` (more than one of them)."""
    return isinstance(value, torch.Tensor) and len(lead) > 1 and value.dim() == len(lead) + 1 \
        and tuple(value.shape[:-1]) == tuple(lead)


def item_shape(flat: tuple, lead: bool, x_shape) -> tuple:
    """An item's shape: ``flat`` (``[T, n]``) or, for an item that keeps the input's leading dims, those
    and ``n``."""
    return tuple(x_shape[:-1]) + tuple(flat[1:]) if lead else tuple(flat)


def item_dtype(rule, x_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype an item is returned in, from its rule in `LiftedMoE.out_dtypes` (``"x"``: the input's)."""
    return x_dtype if rule == "x" else rule


def pack(items: list, container):
    """The forward's result from its items: y alone (``container`` None), or the items in a tuple, list
    or namedtuple class."""
    if container is None:
        return items[0]
    return container(*items) if hasattr(container, "_fields") else container(items)


def derive(kind: str, logits: torch.Tensor, cfg: RouterConfig, score_bias: Optional[torch.Tensor],
           group_size: Optional[int] = None):
    """A host kind from the router logits ``[T, E]`` (fp32 values; the caller casts; ``group_size``:
    tokens per sequence, for a per-sequence capacity)."""
    if kind == "none":
        return None
    if kind == "zloss":
        return torch.logsumexp(logits.float(), dim=-1).square().mean()
    ids = reference.route(logits, cfg, score_bias, group_size)[0]
    if kind == "ids":
        return ids
    flat = ids.flatten().long()                     # counts without bincount's host synchronisation
    keep = flat >= 0
    return torch.zeros(cfg.num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat.clamp(min=0), keep.long())
