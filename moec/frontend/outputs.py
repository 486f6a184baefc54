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

KERNEL_KINDS = ("y", "logits", "aux", "weights")
HOST_KINDS = ("zloss", "ids", "counts", "none")


def slots(outputs: str) -> tuple:
    return tuple(outputs.split("_"))


def kernel_outputs(outputs: str) -> tuple:
    """The program's outputs for ``outputs``: its kernel kinds, and the logits the host kinds need."""
    s = slots(outputs)
    ks = [k for k in s if k in KERNEL_KINDS]
    if any(k in ("zloss", "ids", "counts") for k in s) and "logits" not in ks:
        ks.append("logits")
    return tuple(ks)


def kinds_of(value, T: int, E: int) -> list:
    """The kinds a returned item (not the first) may be, judged by type, dtype and shape."""
    if value is None:
        return ["none"]
    if not isinstance(value, torch.Tensor):
        return []
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


def derive(kind: str, logits: torch.Tensor, cfg: RouterConfig, score_bias: Optional[torch.Tensor]):
    """A host kind from the router logits ``[T, E]`` (fp32 values; the caller casts)."""
    if kind == "none":
        return None
    if kind == "zloss":
        return torch.logsumexp(logits.float(), dim=-1).square().mean()
    ids = reference.route(logits, cfg, score_bias)[0]
    if kind == "ids":
        return ids
    valid = ids[ids >= 0]
    return torch.bincount(valid.flatten(), minlength=cfg.num_experts)


def dtype_of(kind: str, x_dtype: torch.dtype, seen: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype an item of ``kind`` is returned in: as the eager forward gave it at lift (``seen``,
    relative to an input of dtype ``x_dtype`` when it matched it), else the kind's default."""
    return seen if seen is not None else {"logits": x_dtype, "weights": x_dtype, "aux": torch.float32,
                                          "zloss": torch.float32, "ids": torch.int64, "counts": torch.int64,
                                          "none": None, "y": x_dtype}[kind]
