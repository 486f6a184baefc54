"""choose-tiles: attach a tile to every kernel node from a small per-arch table.

Expects: fused nodes (``fused_route``, ``grouped_gemm``, ``reduce_topk``) and ``ctx.arch``.
Guarantees: each has a ``tile`` attribute whose blocks are powers of two no wider than needed
(clamped to the padded problem dims) and whose pipelined shared-memory footprint fits the
arch's per-block limit (stages are reduced until it does). The cost model and autotuning that
refine this per token-count bucket are later work; the table is the safe default.
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.types import DTYPES
from moec.runtime.tiles import GemmTile, RouteTile, RowTile

# arch -> (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for grouped GEMMs
GEMM_TABLE = {
    "cpu": (16, 64, 64, 4, 1),          # the interpreter: few, wide programs run fastest
    "sm80": (64, 128, 32, 4, 4),
    "sm86": (64, 128, 32, 4, 3),
    "sm89": (64, 128, 32, 4, 3),
    "sm90": (64, 128, 64, 4, 4),
    "sm100": (128, 128, 64, 8, 4),
}
ROUTE_TABLE = {"cpu": (16, 64, 4, 1)}
ROUTE_DEFAULT = (32, 64, 4, 3)


def pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def gemm_smem(t: GemmTile, glu: bool, itemsize: int) -> int:
    per_stage = (t.block_m * t.block_k + (2 if glu else 1) * t.block_n * t.block_k) * itemsize
    return per_stage * max(t.num_stages, 1)


def _gemm_tile(n, g, arch) -> GemmTile:
    bm, bn, bk, warps, stages = GEMM_TABLE[arch.name]
    N, K = int(n.types[0].shape[1]), int(g.types[n.ins["a"]].shape[1])
    bn, bk = min(bn, pow2(N)), min(bk, pow2(K))
    size = _itemsize(g.types[n.ins["a"]].dtype)
    tile = GemmTile(bm, bn, bk, warps, stages)
    while stages > 1 and gemm_smem(tile, n.attr["glu"], size) > arch.smem_per_block * 0.9:
        stages -= 1
        tile = GemmTile(bm, bn, bk, warps, stages)
    return tile


def _route_tile(n, g, arch) -> RouteTile:
    bt, bk, warps, stages = ROUTE_TABLE.get(arch.name, ROUTE_DEFAULT)
    return RouteTile(bt, min(bk, pow2(int(g.types[n.ins["x"]].shape[1]))), warps, stages)


def _row_tile(n, g, arch) -> RowTile:
    return RowTile(16, min(128, pow2(int(n.types[0].shape[1]))), 4, 1)


CHOOSERS = {"grouped_gemm": _gemm_tile, "fused_route": _route_tile, "reduce_topk": _row_tile}


def choose_tiles(g: Graph, ctx) -> Graph:
    nodes = [n.replace(attrs={"tile": CHOOSERS[n.op](n, g, ctx.arch)}) if n.op in CHOOSERS else n
             for n in g.nodes]
    return g.with_nodes(nodes)
