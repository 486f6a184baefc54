"""Tiling configurations: typed, frozen, printable (they appear in IR text and kernel headers)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


class _Tile:
    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GemmTile(_Tile):
    """A grouped GEMM tile: BLOCK_M rows (token-expert pairs) x BLOCK_N outputs, BLOCK_K deep."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class RouteTile(_Tile):
    """The routing kernel: BLOCK_T tokens per program, the hidden dim streamed BLOCK_K at a time."""

    block_t: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class RowTile(_Tile):
    """Row-wise kernels (the top-k reduce): BLOCK_T rows x BLOCK_D columns per program."""

    block_t: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


TILE_TYPES = {"GemmTile": GemmTile, "RouteTile": RouteTile, "RowTile": RowTile}
