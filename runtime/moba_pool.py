"""The block pooling of MoBA's keys (a torch op: ``O(N D)``, deterministic, no host synchronisation),
with the optional causal key convolution; packed sequences lay their blocks out as `moba_maps` says."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .moba_maps import _row_positions, block_offsets, bounded


def key_conv_packed(k: Tensor, weight: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    """The causal depthwise key convolution of `moec.moba.reference` over ``[B, Hkv, N, D]`` in fp32,
    zero padded at every sequence start."""
    kc = weight.shape[2]
    kf = k.float()
    _, pos = _row_positions(k.shape[2], cu_seqlens, k.device)
    w = weight.float()
    out = torch.zeros_like(kf)
    for s in range(kc):
        shift = kc - 1 - s                                  # w[..., s] weighs k[t - shift]
        if shift >= k.shape[2]:
            continue
        shifted = _shift_rows(kf, shift)
        keep = (pos >= shift).to(kf.dtype)[None, None, :, None]
        out = out + shifted * keep * w[None, :, None, :, s]
    return out


def _shift_rows(x: Tensor, shift: int) -> Tensor:
    """``x`` moved ``shift`` rows down along dim 2 (zeros enter at the top)."""
    if shift == 0:
        return x
    return torch.cat([x.new_zeros(*x.shape[:2], shift, x.shape[3]), x[:, :, :-shift]], 2)


def pool_keys(k: Tensor, block_size: int, cu_seqlens: Optional[Tensor] = None,
              kconv_weight: Optional[Tensor] = None) -> Tensor:
    """Block representatives ``[B, Hkv, NB, D]`` in ``k``'s dtype (fp32 accumulation): the mean of each
    block's (convolved) keys over its real length. Without ``cu_seqlens`` ``NB = cdiv(N, bs)``; with it the
    blocks of sequence ``s`` are rows ``offsets[s] + j`` (`block_offsets`) of ``NB = cdiv(N, bs) + S``
    rows (the rows past the last sequence's blocks are zero).

    Cost: one read of ``k`` (a view when ``k`` is contiguous along N; the key convolution, when on,
    is materialised in fp32), plus, for packed sequences, one scattered copy of ``k`` in its dtype
    (each cell written once: deterministic, no atomics)."""
    B, Hkv, N, D = k.shape
    bs = block_size
    cu_seqlens = bounded(cu_seqlens, N)
    src = key_conv_packed(k, kconv_weight, cu_seqlens) if kconv_weight is not None else k
    if cu_seqlens is None:
        nfull, rem = divmod(N, bs)
        parts = []
        if nfull:
            parts.append(src[:, :, :nfull * bs].reshape(B, Hkv, nfull, bs, D).sum(3, dtype=torch.float32) / bs)
        if rem:
            parts.append(src[:, :, nfull * bs:].sum(2, keepdim=True, dtype=torch.float32) / rem)
        if not parts:
            return k.new_zeros(B, Hkv, 0, D)
        return torch.cat(parts, 2).to(k.dtype)
    offs, nb_max = block_offsets(cu_seqlens, N, bs)
    seq, pos = _row_positions(N, cu_seqlens, k.device)
    blk = offs.to(torch.int64)[seq] + pos // bs                             # packed block of each row
    grid = src.new_zeros(B, Hkv, nb_max * bs, D)
    grid[:, :, blk * bs + pos % bs] = src                                   # the rows, block-aligned
    sums = grid.reshape(B, Hkv, nb_max, bs, D).sum(3, dtype=torch.float32)
    counts = torch.zeros(nb_max, dtype=torch.float32, device=k.device).index_add_(
        0, blk, torch.ones(N, device=k.device))                            # small integers: exact
    return (sums / counts.clamp(min=1)[None, None, :, None]).to(k.dtype)
