"""Index maps of the MoBA kernels: packed sequences (varlen) and strides, built on the device.

Varlen without host synchronisation: a launch over packed sequences gets an upper bound of
``cdiv(N, BLOCK_M) + S`` query tiles (``sum_s cdiv(len_s, BLOCK_M)`` can be no more); two small
int32 maps built on the device with ``cumsum``/``searchsorted`` say which sequence and which tile
of it each program owns (``tile_seq = S`` for a surplus program, which exits at once). Tiles never
cross a sequence boundary, so every row of a tile shares its sequence's start and length.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def query_tile_map(cu_seqlens: Tensor, n_rows: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """``(tile_seq, tile_local, n_programs)``: program ``p`` owns tile ``tile_local[p]`` of sequence
    ``tile_seq[p]`` (``S`` for a surplus program). No host synchronisation."""
    S = cu_seqlens.numel() - 1
    n_prog = -(-n_rows // block_m) + S
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    tiles = (lens + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    p = torch.arange(n_prog, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, p, right=True)                            # first s with ends[s] > p
    start = torch.cat([ends.new_zeros(1), ends])[seq.clamp(max=S)]
    return seq.to(torch.int32), (p - start).to(torch.int32), n_prog


def query_programs(cu_seqlens: Optional[Tensor], n_rows: int, block_m: int) -> tuple:
    """``(tile_seq, tile_local, n_programs, n_sequences)`` of a query-tile-major launch: the packed map of
    `query_tile_map`, or (None, None, cdiv(n_rows, block_m), 1) for one sequence per batch row."""
    if cu_seqlens is None:
        return None, None, -(-n_rows // block_m), 1
    return (*query_tile_map(cu_seqlens, n_rows, block_m), cu_seqlens.numel() - 1)


def strides(t: Tensor, prefix: str, dims: str) -> dict:
    """``{f"stride_{prefix}{dim}": t.stride(i)}`` for the kernels' stride arguments (``dims``: ``"bhnd"``, ...)."""
    return {f"stride_{prefix}{d}": t.stride(i) for i, d in enumerate(dims)}


def block_offsets(cu_seqlens: Tensor, n_rows: int, block_size: int) -> tuple[Tensor, int]:
    """``(offsets, n_blocks_max)``: sequence ``s``'s blocks are rows ``offsets[s] + j`` of the packed
    pooled-key tensor, which has ``n_blocks_max = cdiv(N, bs) + S`` rows (an upper bound)."""
    S = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    nb = (lens + block_size - 1) // block_size
    return (torch.cumsum(nb, 0) - nb).to(torch.int32), -(-n_rows // block_size) + S


def packed_blocks(cu_seqlens: Tensor, n_rows: int, block_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The key blocks of packed sequences, numbered across sequences (sequence ``s``'s block ``j`` is
    ``offsets[s] + j``, `block_offsets`): ``(offsets, start, end, local, NB)`` with each packed block's
    first row, its end (its sequence's end at most; ``end = start`` for the unused blocks of the upper
    bound ``NB``) and its number inside its sequence. Device ops only."""
    offsets, NB = block_offsets(cu_seqlens, n_rows, block_size)
    S = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    nb = (cu[1:] - cu[:-1] + block_size - 1) // block_size
    jb = torch.arange(NB, device=cu.device)
    seq = torch.searchsorted(torch.cumsum(nb, 0), jb, right=True).clamp(max=S - 1)
    local = jb - offsets[seq]
    start = cu[seq] + local * block_size
    end = torch.where(jb < nb.sum(), torch.minimum(start + block_size, cu[seq + 1]), start)
    return offsets, start.to(torch.int32), end.to(torch.int32), local.to(torch.int32), NB


def _row_positions(n_rows: int, cu_seqlens: Optional[Tensor], device) -> tuple[Tensor, Tensor]:
    """Per packed row: (its sequence index, its position inside the sequence)."""
    rows = torch.arange(n_rows, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(rows), rows
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)
    return seq, rows - cu_seqlens.to(torch.int64)[seq]


def bounded(cu_seqlens: Optional[Tensor], n_rows: int) -> Optional[Tensor]:
    """``cu_seqlens`` made safe to index with whatever its values: clamped to ``[0, N]``,
    non-decreasing, first 0 and last N (a valid one comes back equal). `moec.ops.moba_attention`
    checks the values on the host; under CUDA graph capture it cannot, and every launcher passes its
    ``cu_seqlens`` through this, so no kernel reads outside the tensors. Device ops only."""
    if cu_seqlens is None or cu_seqlens.numel() < 2:
        return cu_seqlens
    c = torch.cummax(cu_seqlens.clamp(0, n_rows), 0).values
    return torch.cat([c.new_zeros(1), c[1:-1], c.new_full((1,), n_rows)]).to(torch.int32)
