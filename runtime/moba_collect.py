"""The key-block-major lists of the MoBA backward's d k / d v kernel: per (batch, kv head, key block),
the (query, slot) entries whose row selected the block strictly before the query's own block.

`collect_block_queries` (torch ops on the device, no host synchronisation): each (query, slot) whose
block is strictly before the query's own block (and not a repeat of another slot of the row) becomes an
entry ``((b * H + h) * N + row) * K + slot``; entries are grouped by (batch, kv head, key block) with one
stable ``torch.sort`` of int32 segment keys (so inside a list: query head, then row, ascending), and
``searchsorted`` gives the CSR offsets. The query heads of a GQA group share one list per key block:
they read the same keys. Rows are sorted along K first (``-1`` first), so the slot an entry names is its
rank in the sorted row.

Memory while it runs: under ``E * 47`` bytes for ``E = B * H * N * K`` entries (int32 keys sorted along
K, a mask, the stable sort's int32 keys and int64 entry ids, and its scratch), of which the int64
entries (``E * 8``) stay until the launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .moba_maps import _row_positions, packed_blocks


@dataclass
class BlockQueryLists:
    """CSR lists: entries ``entries[offsets[s] : offsets[s + 1]]`` of segment ``s = (b * Hkv + hk) * NB + j``
    picked key block ``j`` (packed block number with ``cu_seqlens``); the entries past ``offsets[-1]``
    are padding."""

    entries: Tensor              # int64 [E]: ((b * H + h) * N + row) * K + slot, grouped by segment
    offsets: Tensor              # int64 [n_seg + 1]
    blocks: Optional[tuple]      # varlen only: per packed block its (first row, end, number in its sequence),
    #                              int32 [NB] each (`moba_maps.packed_blocks`)
    n_blocks: int                # NB: key blocks per (batch, kv head) (an upper bound with cu_seqlens)
    n_seg: int


def collect_block_queries(indices: Tensor, *, block_size: int, kv_heads: int,
                          cu_seqlens: Optional[Tensor] = None) -> BlockQueryLists:
    """Group the selections of ``indices [B, H, N, K]`` by (batch, kv head, key block), own block and
    non-past blocks excluded. Torch ops only, no host synchronisation: sizes come from the shapes."""
    B, H, N, K = indices.shape
    dev = indices.device
    G = H // kv_heads
    bs = block_size
    seq, pos = _row_positions(N, cu_seqlens, dev)
    own = (pos // bs).to(torch.int32)                                     # c(row)
    if cu_seqlens is None:
        NB = -(-N // bs)
        row_blk0 = torch.zeros(N, dtype=torch.int32, device=dev)
        blocks = None
    else:
        boff, *blocks, NB = packed_blocks(cu_seqlens, N, bs)            # (start, end, local) per packed block
        row_blk0 = boff[seq]                                              # the row's sequence's block 0
    n_seg = B * kv_heads * NB
    if n_seg + 1 >= 2**31:
        raise ValueError(f"{n_seg} (batch, kv head, block) lists do not fit int32 keys")

    # buffers of E = B*H*N*K entries are built in place and dropped as soon as used (peak memory)
    key = torch.sort(indices, dim=-1).values.contiguous()                 # -1 first; repeats adjacent
    keep = key >= 0
    keep &= key < own[:, None]                                            # strictly before the own block
    keep[..., 1:] &= key[..., 1:] != key[..., :-1]                        # a repeated block counts once
    bh = torch.arange(B * H, device=dev, dtype=torch.int32).view(B, H)
    seg0 = ((bh // H) * kv_heads + (bh % H) // G) * NB                    # (b * Hkv + hk) * NB
    key += (seg0[:, :, None] + row_blk0)[..., None]                       # the segment of each entry
    key.masked_fill_(~keep, n_seg)                                        # not a past block: sorts last
    del keep
    sorted_key, entries = torch.sort(key.view(-1), stable=True)
    del key
    offsets = torch.searchsorted(sorted_key, torch.arange(n_seg + 1, device=dev, dtype=torch.int32))
    return BlockQueryLists(entries, offsets, tuple(blocks) if blocks else None, NB, n_seg)
