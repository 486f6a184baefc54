"""Tiling configurations of every kernel kind: typed, frozen, printable (they appear in IR text and kernel headers),
and the token-count buckets a kernel node's tiles are chosen for.

A kernel node carries ``tiles={16: GemmTile(...), 128: ..., None: ...}``: the tile for each bucket
of the token count T, keyed by the bucket's inclusive upper bound, ``None`` for every larger T
(one entry ``{None: tile}`` serves every T). The runtime picks the bucket of the current T, a
host-side int, so the choice costs no device synchronisation; each bucket's kernel is rendered
once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


class Tile:
    """Base of every tile dataclass: printable as a dict (dumps, tiles.json)."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GemmTile(Tile):
    """A grouped GEMM tile: BLOCK_M rows (token-expert pairs) x BLOCK_N outputs, BLOCK_K deep.

    ``group_m`` is the program order: programs sweep ``group_m`` row tiles fastest, then the N
    tiles, then the next ``group_m`` row tiles, so the rows of a group stay in L2 while the
    weight columns stream past (1: each row tile sweeps all of N before the next; at least the
    grid's row tiles: rows fastest over the whole grid).

    ``persistent`` (0: off) makes the kernel persistent: a grid of ``persistent`` programs per SM
    (the slots the tile's occupancy allows), each looping over output tiles; 0 launches one program
    per tile. Not printed when 0."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    persistent: int = 0

    def __repr__(self) -> str:
        tail = f", persistent={self.persistent}" if self.persistent else ""
        return (f"GemmTile(block_m={self.block_m}, block_n={self.block_n}, block_k={self.block_k}, "
                f"num_warps={self.num_warps}, num_stages={self.num_stages}, group_m={self.group_m}{tail})")


@dataclass(frozen=True)
class RouteTile(Tile):
    """The routing kernel: BLOCK_T tokens per program, the hidden dim streamed BLOCK_K at a time."""

    block_t: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class RowTile(Tile):
    """Row-wise kernels (the top-k reduce): BLOCK_T rows x BLOCK_D columns per program."""

    block_t: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class MobaGateTile(Tile):
    """The MoBA gate: BLOCK_M query rows per program (resident), pooled keys streamed BLOCK_NB blocks at a time."""

    block_m: int
    block_nb: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class MobaAttentionTile(Tile):
    """MoBA attention kernels: BLOCK_M query rows per program (gathered rows per chunk in the densify
    scheme), keys in chunks of BLOCK_N; ``window`` (densify only, 0 elsewhere): the consecutive query
    rows one densify program owns, a power-of-two multiple of BLOCK_M. Not printed when 0."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    window: int = 0

    def __repr__(self) -> str:
        tail = f", window={self.window}" if self.window else ""
        return (f"MobaAttentionTile(block_m={self.block_m}, block_n={self.block_n}, num_warps={self.num_warps}, "
                f"num_stages={self.num_stages}{tail})")


TILE_TYPES = {t.__name__: t for t in (GemmTile, RouteTile, RowTile, MobaGateTile, MobaAttentionTile)}


def pow2(n: int, lo: int = 16) -> int:
    """The smallest power of two >= ``n`` and >= ``lo``: what a tile dimension pads ``n`` to."""
    p = lo
    while p < n:
        p *= 2
    return p


# ---- token-count buckets ---------------------------------------------------------------------

BUCKETS: tuple = (16, 128, 1024, None)   # T <= 16 (decode), <= 128, <= 1024, larger


def bucket_of(T: int, bounds) -> Optional[int]:
    """The bound of the first bucket (in ascending order, ``None`` last) that holds ``T``."""
    for b in bounds:
        if b is None or T <= b:
            return b
    raise ValueError(f"no bucket holds T={T}: bounds {list(bounds)} need a last None bucket")


def at_bucket(per_bucket: dict, T: int):
    """The entry of ``{bound: value}`` (ascending bounds, ``None`` last) whose bucket holds ``T``."""
    return per_bucket[bucket_of(T, list(per_bucket))]


def bucket_ranges(bounds) -> list[tuple[int, Optional[int]]]:
    """``[(lo, hi)]`` per bound: the bucket holds ``lo <= T <= hi`` (``hi`` None: unbounded)."""
    out, lo = [], 1
    for b in bounds:
        out.append((lo, b))
        lo = (b or 0) + 1
    return out


def bucket_text(lo: int, hi: Optional[int]) -> str:
    if hi is None:
        return f"T >= {lo}" if lo > 1 else "every T"
    return f"T <= {hi}" if lo <= 1 else f"{lo} <= T <= {hi}"


def bucket_suffix(lo: int, hi: Optional[int]) -> str:
    """A kernel-name suffix for a bucket: ``T1to16``, ``T17to128``, ``T1025up``."""
    return f"T{lo}up" if hi is None else f"T{lo}to{hi}"


def bucket_key(bound: Optional[int]) -> str:
    """The JSON key of a bucket bound (the autotune file): ``"T<=16"``, ``"T>1024"``."""
    if bound is not None:
        return f"T<={bound}"
    finite = [b for b in BUCKETS if b is not None]
    return f"T>{finite[-1]}"


def merge_buckets(tiles: dict) -> dict:
    """Ascending bounds, ``None`` last; a bucket whose tile equals the next one's is folded into it."""
    items = sorted(tiles.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    out: dict = {}
    for i, (bound, tile) in enumerate(items):
        if i + 1 < len(items) and items[i + 1][1] == tile:
            continue
        out[bound] = tile
    return out
