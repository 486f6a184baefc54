"""Shared pieces of the MoBA kernels: tiles (a per block-size, per-arch table), packed-sequence
(varlen) maps, and the block pooling of the keys (a torch op).

Varlen without host synchronisation: a launch over packed sequences gets an upper bound of
``cdiv(N, BLOCK_M) + S`` query tiles (``sum_s cdiv(len_s, BLOCK_M)`` can be no more); two small
int32 maps built on the device with ``cumsum``/``searchsorted`` say which sequence and which tile
of it each program owns (``tile_seq = S`` for a surplus program, which exits at once). Tiles never
cross a sequence boundary, so every row of a tile shares its sequence's start and length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .arch import ARCHS, Arch
from moec.ir.tiles import MobaAttentionTile, MobaGateTile
from .launch import Kernel, LaunchRecord, specialize, triton_type


def pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


# ----------------------------------------------------------------------------------------------
# a launch, prepared: run it, or turn it into a record without running it (AOT checks of big tiles)

@dataclass
class LaunchPlan:
    kernel: Kernel
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel(self.grid, self.args, self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def record(self) -> LaunchRecord:
        """The `LaunchRecord` running it would make (works for ``meta`` tensors: nothing runs)."""
        sig = {k: triton_type(v) for k, v in self.args.items() if v is not None}
        spec = {k: specialize(v) for k, v in self.args.items() if v is not None}
        return LaunchRecord(self.kernel, tuple(self.grid), sig, dict(self.constexprs), self.num_warps,
                            self.num_stages, spec)


# ----------------------------------------------------------------------------------------------
# tiles

# Attention: (BLOCK_M, BLOCK_N, warps, stages) per arch for block sizes >= 64, D <= 128 (sm120 has
# sm89's 99 KB of shared memory and mma.sync: it takes sm89's rows in every table).
# BLOCK_M = 64 is the smallest wgmma/tcgen05 M; a larger M would widen the union of blocks a tile
# visits (each row selects its own). BLOCK_N <= block size, 128 where shared memory allows it
# (K and V chunks of [BLOCK_N, D] per stage).
_ATTN = {
    "sm80": {64: (64, 64, 4, 2), 128: (64, 64, 4, 3), 256: (64, 64, 4, 3), 512: (64, 64, 4, 3)},
    "sm86": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm89": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm90": {64: (64, 64, 4, 3), 128: (64, 128, 8, 2), 256: (64, 128, 8, 2), 512: (64, 128, 8, 2)},
    "sm100": {64: (64, 64, 4, 3), 128: (64, 128, 8, 2), 256: (64, 128, 8, 2), 512: (64, 128, 8, 2)},
    "sm120": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
}
# Gate: (BLOCK_M, BLOCK_NB, warps, stages); FlashMoBA uses 128 x 32 (D = 128) with 4 warps.
_GATE = {"sm80": (64, 32, 4, 2), "sm86": (64, 32, 4, 2), "sm89": (64, 32, 4, 2),
         "sm90": (128, 32, 4, 2), "sm100": (128, 32, 4, 2), "sm120": (64, 32, 4, 2)}


# Densify (key-block-major gathered tiles, `moba_densify_kernel`): (BLOCK_M, BLOCK_N, warps, stages).
# Every program does the same work (BLOCK_M gathered rows x one whole block of keys), so a larger
# BLOCK_M only costs the partly filled last chunk of each (key block, kv head) list; 128 rows with 8
# warps where shared memory allows (the gathered q tile stays resident; K and V chunks pipelined).
# The key loop has a constexpr trip count (bs / BLOCK_N), so it is an scf.for that Triton pipelines.
_DENSIFY = {
    "sm80": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (128, 64, 8, 2), 512: (128, 64, 8, 2)},
    "sm86": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm89": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm90": {64: (128, 64, 8, 2), 128: (128, 128, 8, 2), 256: (128, 128, 8, 2), 512: (128, 128, 8, 2)},
    "sm100": {64: (128, 64, 8, 2), 128: (128, 128, 8, 2), 256: (128, 128, 8, 2), 512: (128, 128, 8, 2)},
    "sm120": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
}
# Own block + merge (`moba_densify_kernel`): consecutive query rows x their own block, causal. BLOCK_M
# divides the block size, so a tile never spans two blocks (no keys of a neighbour block visited).
_OWN = {
    "sm80": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm86": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm89": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
    "sm90": {64: (64, 64, 4, 2), 128: (128, 64, 8, 2), 256: (128, 64, 8, 2), 512: (128, 64, 8, 2)},
    "sm100": {64: (64, 64, 4, 2), 128: (128, 64, 8, 2), 256: (128, 64, 8, 2), 512: (128, 64, 8, 2)},
    "sm120": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (64, 64, 4, 2)},
}


def _arch(arch) -> Arch:
    return arch if isinstance(arch, Arch) else ARCHS[arch or "cpu"]


def attention_smem(tile: MobaAttentionTile, head_dim: int, itemsize: int = 2) -> int:
    """Pipelined shared-memory estimate: K and V chunks per stage plus the resident q tile."""
    d = pow2(head_dim)
    return (tile.num_stages * 2 * tile.block_n + tile.block_m) * d * itemsize


def gate_smem(tile: MobaGateTile, head_dim: int, itemsize: int = 2) -> int:
    d = pow2(head_dim)
    return (tile.num_stages * tile.block_nb + tile.block_m) * d * itemsize


def attention_tile(block_size: int, head_dim: int, arch: str | Arch | None = None) -> MobaAttentionTile:
    """The attention tile for a block size and head dim on ``arch`` (``"cpu"``: the interpreter).
    From the table, then stages and BLOCK_N reduced until the 16-bit estimate fits 90% of the
    arch's shared memory (only D > 128 needs that)."""
    a = _arch(arch)
    bn_cap = pow2(block_size)
    if a.name == "cpu":      # the interpreter: few, wide programs run fastest (its cost is per op)
        return MobaAttentionTile(64, min(64, bn_cap), 4, 1)
    row = _ATTN[a.name]
    key = min((b for b in row if b >= block_size), default=max(row))
    bm, bn, warps, stages = row[key]
    tile = MobaAttentionTile(bm, max(16, min(bn, bn_cap)), warps, stages)
    while attention_smem(tile, head_dim) > 0.9 * a.smem_per_block:
        if tile.num_stages > 2:
            tile = MobaAttentionTile(tile.block_m, tile.block_n, tile.num_warps, tile.num_stages - 1)
        elif tile.block_n > 32:
            tile = MobaAttentionTile(tile.block_m, tile.block_n // 2, tile.num_warps, tile.num_stages)
        elif tile.num_stages > 1:
            tile = MobaAttentionTile(tile.block_m, tile.block_n, tile.num_warps, 1)
        else:
            break
    return tile


def _table_tile(table: dict, block_size: int, head_dim: int, a: Arch) -> MobaAttentionTile:
    """A table entry for the block size, BLOCK_N <= the block, then shrunk (stages, BLOCK_N, BLOCK_M)
    until the 16-bit shared-memory estimate fits 90% of the arch (only D > 128 needs that)."""
    row = table[a.name]
    key = min((b for b in row if b >= block_size), default=max(row))
    bm, bn, warps, stages = row[key]
    tile = MobaAttentionTile(bm, max(16, min(bn, pow2(block_size))), warps, stages)
    while attention_smem(tile, head_dim) > 0.9 * a.smem_per_block:
        bm, bn, warps, stages = tile.block_m, tile.block_n, tile.num_warps, tile.num_stages
        if stages > 2:
            stages -= 1
        elif bn > 32:
            bn //= 2
        elif bm > 64:
            bm, warps = bm // 2, max(4, warps // 2)
        elif stages > 1:
            stages = 1
        else:
            break
        tile = MobaAttentionTile(bm, bn, warps, stages)
    return tile


def densify_tile(block_size: int, head_dim: int, arch: str | Arch | None = None) -> MobaAttentionTile:
    """The gathered-query tile of the densify scheme (BLOCK_M gathered rows, keys in BLOCK_N chunks)."""
    a = _arch(arch)
    if a.name == "cpu":      # the interpreter: few, wide programs
        return MobaAttentionTile(64, min(64, pow2(block_size)), 4, 1)
    return _table_tile(_DENSIFY, block_size, head_dim, a)


def own_tile(block_size: int, head_dim: int, arch: str | Arch | None = None) -> MobaAttentionTile:
    """The own-block (causal diagonal) + merge tile of the densify scheme."""
    a = _arch(arch)
    if a.name == "cpu":
        return MobaAttentionTile(64, min(64, pow2(block_size)), 4, 1)
    return _table_tile(_OWN, block_size, head_dim, a)


# ----------------------------------------------------------------------------------------------
# which attention scheme

SCHEMES = ("auto", "rows", "densify")
DENSIFY_BLOCKS_PER_K = 4     # unmeasured on a GPU: a guess from the work model below


def choose_scheme(scheme: str, *, n_rows: int, block_size: int, top_k: int, n_seqs: int = 1) -> str:
    """``"rows"`` or ``"densify"`` for ``scheme`` (``"auto"`` decides from host-side shapes only).

    The rows scheme's program does |union of the blocks its BLOCK_M rows selected| x bs x BLOCK_M of
    score work for top_k x bs x BLOCK_M useful; the union can only exceed top_k when a sequence has
    more blocks than that, and grows toward all of them as N grows. Densify does the useful work
    (plus partly filled last chunks) but pays the collect (a sort of B*H*N*K keys) and the partials'
    traffic (write + read of K partial rows per query). So ``"auto"`` picks densify when the average
    sequence (``n_rows / n_seqs``: no look at ``cu_seqlens``, which would synchronise) has more than
    ``DENSIFY_BLOCKS_PER_K * top_k`` blocks, rows otherwise (short N, decode-like shapes, few blocks,
    and ``top_k = 1``: the own block alone, whose rows scheme has no union to waste work on).
    The factor is a guess: it has not been measured on a GPU."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme != "auto":
        return scheme
    if top_k <= 1:
        return "rows"
    avg_len = -(-n_rows // max(1, n_seqs))
    return "densify" if -(-avg_len // block_size) > DENSIFY_BLOCKS_PER_K * top_k else "rows"


def gate_tile(block_size: int, head_dim: int, arch: str | Arch | None = None) -> MobaGateTile:
    """The gate tile: wide pooled-key tiles when blocks are small (many blocks), narrow when D is large."""
    a = _arch(arch)
    if a.name == "cpu":
        return MobaGateTile(64, 32, 4, 1)
    bm, bnb, warps, stages = _GATE[a.name]
    if head_dim <= 64 and block_size <= 128:
        bnb = 64
    if block_size >= 512:    # few blocks per sequence
        bnb = 16
    if head_dim > 128:
        bm = min(bm, 64)
    return MobaGateTile(bm, bnb, warps, stages)


# ----------------------------------------------------------------------------------------------
# packed sequences

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


# ----------------------------------------------------------------------------------------------
# pooling (a torch op: O(N * D), deterministic, no host synchronisation)

def _row_positions(n_rows: int, cu_seqlens: Optional[Tensor], device) -> tuple[Tensor, Tensor]:
    """Per packed row: (its sequence index, its position inside the sequence)."""
    rows = torch.arange(n_rows, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(rows), rows
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)
    return seq, rows - cu_seqlens.to(torch.int64)[seq]


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
