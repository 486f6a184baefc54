"""Dispatch: group the (token, slot) pairs of a routing decision by expert.

The grouped GEMM reads its rows through the permutation computed here (the permute is folded
into its prologue, the un-permute into its epilogue), so this is the only data movement the
routed path does outside the kernels.

Everything is a fixed-shape torch op on the ids' device: no ``.item()``, no ``nonzero``, no
``bincount`` (whose CUDA output size depends on the data), so a CUDA graph can capture it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dispatch(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Sort the flat pairs ``p = t * k + slot`` of ``ids [T, k]`` by expert.

    ``ids`` holds expert indices in ``[0, E)`` or ``-1`` for a pair dropped by capacity.
    Returns ``(order, offsets)``, both int32:

    - ``order [T*k]``: pair indices sorted by expert, stable (token order, then slot order,
      within an expert), dropped pairs last;
    - ``offsets [E+1]``: expert ``e``'s pairs are ``order[offsets[e]:offsets[e+1]]``;
      ``offsets[E]`` is the number of kept pairs (rows past it in ``order`` are dropped pairs).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, k], got shape {tuple(ids.shape)}")
    E = int(num_experts)
    if E < 1:
        raise ValueError(f"num_experts must be >= 1, got {E}")
    key = ids.reshape(-1).to(torch.int64)
    key = torch.where(key < 0, torch.full_like(key, E), key)        # dropped pairs sort last
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(E + 1, dtype=torch.int64, device=ids.device)
    # offsets[e] = first sorted position whose expert is >= e; offsets[E] = number kept.
    offsets = torch.searchsorted(sorted_key, bounds, right=False, out_int32=True)
    return order.to(torch.int32), offsets
