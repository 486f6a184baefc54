"""MoBA's tiles: per-arch tables (MoBA's kernels are not in the cost model yet) for the gate and the rows
and densify attention kernels, shrunk until their pipelined shared memory fits the arch.

choose-tiles (`moec.passes.choose_tiles`) asks `moba_tile` for every MoBA kernel node; tests and
benchmarks call the per-kernel functions directly. ``arch`` ``cpu`` is the Triton interpreter: few,
wide programs run fastest there (its cost is per op, not per FLOP).
"""
from __future__ import annotations

from moec.ir.tiles import MobaAttentionTile, MobaGateTile, pow2
from moec.runtime.arch import ARCHS, Arch

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


# Densify (`moba_window_kernel`: windows owning their rows' softmax state, gathered rows per block):
# (BLOCK_M gathered rows, BLOCK_N keys, warps, stages, WINDOW rows per program). The kernel's block walk
# keeps the window's index tile and its addressing live around a pipelined key loop, so 64 x 64 chunks
# spill at 4 or 8 warps (sm80-sm100, D = 128, two stages); 64 x 32 with 8 warps is the widest pipelined
# tile that compiles without spills on every arch (the AOT test checks each entry). A window of 256 rows
# keeps its fp32 state (256 x (D + 2) x 4 bytes) in L2 for every resident program.
_WINDOW = {a: {bs: (64, 32, 8, 2, 256) for bs in (64, 128, 256, 512)} for a in _ATTN}


def _arch(arch) -> Arch:
    return arch if isinstance(arch, Arch) else ARCHS[arch or "cpu"]


def attention_smem(tile: MobaAttentionTile, head_dim: int, itemsize: int = 2) -> int:
    """Pipelined shared-memory estimate: K and V chunks per stage plus the resident q tile."""
    d = pow2(head_dim)
    return (tile.num_stages * 2 * tile.block_n + tile.block_m) * d * itemsize


def gate_smem(tile: MobaGateTile, head_dim: int, itemsize: int = 2) -> int:
    d = pow2(head_dim)
    return (tile.num_stages * tile.block_nb + tile.block_m) * d * itemsize


def _table_tile(table: dict, block_size: int, head_dim: int, a: Arch) -> MobaAttentionTile:
    """A table entry for the block size, BLOCK_N <= the block, then shrunk (stages, BLOCK_N, BLOCK_M)
    until the 16-bit shared-memory estimate fits 90% of the arch (only D > 128 needs that)."""
    row = table[a.name]
    key = min((b for b in row if b >= block_size), default=max(row))
    bm, bn, warps, stages, *window = row[key]
    window = window[0] if window else 0
    tile = MobaAttentionTile(bm, max(16, min(bn, pow2(block_size))), warps, stages, window)
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
        tile = MobaAttentionTile(bm, bn, warps, stages, window)
    return tile


def _tile(table: dict, block_size: int, head_dim: int, arch) -> MobaAttentionTile:
    a = _arch(arch)
    if a.name == "cpu":      # the interpreter: few, wide programs
        return MobaAttentionTile(64, min(64, pow2(block_size)), 4, 1, 128 if table is _WINDOW else 0)
    return _table_tile(table, block_size, head_dim, a)


def attention_tile(block_size: int, head_dim: int, arch: str | Arch | None = None) -> MobaAttentionTile:
    """The rows attention's tile (BLOCK_M query rows, keys in BLOCK_N chunks)."""
    return _tile(_ATTN, block_size, head_dim, arch)


def densify_tile(block_size: int, head_dim: int, arch: str | Arch | None = None) -> MobaAttentionTile:
    """The densify scheme's tile: WINDOW rows per program, gathered rows BLOCK_M at a time, keys in BLOCK_N chunks."""
    return _tile(_WINDOW, block_size, head_dim, arch)


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


# The backward (`moec.runtime.moba_backward_kernel`): d q by query tiles (the rows forward's layout, with
# d out resident too), d k / d v by BLOCK_N keys with gathered query rows streamed BLOCK_M at a time.
_DQ = {a: {bs: (64, 64, 4, 2) for bs in (64, 128, 256, 512)} for a in _ATTN}
_DKDV = {a: {bs: (64, 64, 4, 2) for bs in (64, 128, 256, 512)} for a in _ATTN}


def backward_smem(tile: MobaAttentionTile, head_dim: int, itemsize: int = 2) -> int:
    """Shared-memory estimate of a backward kernel: its resident BLOCK_N x D key and value chunks (d q: streamed)
    and, per stage, BLOCK_M x D rows of q and d out, at the inputs' element size (fp32: 4 bytes)."""
    d = pow2(head_dim)
    return (2 * tile.block_n + tile.num_stages * 2 * tile.block_m) * d * itemsize + tile.block_m * tile.block_n * 4


def _backward_tile(table: dict, block_size: int, head_dim: int, arch, itemsize: int) -> MobaAttentionTile:
    """The table's tile, shrunk (stages, gathered rows, keys) until `backward_smem` fits 80% of the arch."""
    a = _arch(arch)
    tile = _tile(table, block_size, head_dim, a)
    while a.name != "cpu" and backward_smem(tile, head_dim, itemsize) > 0.8 * a.smem_per_block:
        bm, bn, warps, stages = tile.block_m, tile.block_n, tile.num_warps, tile.num_stages
        if stages > 1:
            stages -= 1
        elif bm > 16:
            bm //= 2
        elif bn > 16:
            bn //= 2
        else:
            break
        tile = MobaAttentionTile(bm, bn, warps, stages)
    return tile


def dq_tile(block_size: int, head_dim: int, arch: str | Arch | None = None, itemsize: int = 2) -> MobaAttentionTile:
    """The backward's d q tile (BLOCK_M query rows, keys in BLOCK_N chunks)."""
    return _backward_tile(_DQ, block_size, head_dim, arch, itemsize)


def dkdv_tile(block_size: int, head_dim: int, arch: str | Arch | None = None, itemsize: int = 2) -> MobaAttentionTile:
    """The backward's d k / d v tile (BLOCK_N keys owned, query rows BLOCK_M at a time)."""
    return _backward_tile(_DKDV, block_size, head_dim, arch, itemsize)


# the tile of each MoBA kernel op: (function, head dim from q's type)
_BY_OP = {"fused_block_gate": gate_tile, "block_sparse_attention": attention_tile,
          "block_sparse_attention_dq": dq_tile, "block_sparse_attention_dkdv": dkdv_tile}


def moba_tile(op: str, block_size: int, head_dim: int, arch: Arch, itemsize: int = 2, scheme: str = "rows"):
    """The table's tile for a MoBA kernel op (``itemsize``: of its inputs; the backward's tiles depend on it;
    ``scheme``: the attention's, ``densify`` taking `densify_tile`)."""
    if op in ("block_sparse_attention_dq", "block_sparse_attention_dkdv"):
        return _BY_OP[op](block_size, head_dim, arch, itemsize)
    if op == "block_sparse_attention" and scheme == "densify":
        return densify_tile(block_size, head_dim, arch)
    return _BY_OP[op](block_size, head_dim, arch)
