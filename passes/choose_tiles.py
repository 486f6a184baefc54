"""choose-tiles: attach to every kernel node the tile of each token-count bucket.

Expects: fused nodes (``fused_route``, ``grouped_gemm``, ``reduce_topk``) and ``ctx.arch``.
Guarantees: each has a ``tiles`` attribute ``{bound: tile}`` over the buckets of
`moec.ir.tiles.BUCKETS` (``T <= 16``, ``<= 128``, ``<= 1024``, larger: ``None``), with
adjacent buckets that got the same tile folded into one (``{None: tile}`` serves every T). Blocks
are powers of two no wider than the padded problem dims; on a GPU arch each tile's pipelined
shared memory fits the arch's per-block limit and its accumulators fit in registers.

Where the tile comes from, per bucket:

1. the autotune file (`moec.runtime.autotune`), when it has an entry for this device, kernel
   (`autotune.kernel_key`) and bucket, and the entry is one of the cost model's legal candidates
   on this arch; an entry that is malformed or not legal here is ignored with a
   `autotune.TuneWarning` naming it (never silently);
2. otherwise the cost model (`passes/cost_model.py`): the candidate with the least predicted
   time over the bucket's sample token counts;
3. on ``cpu`` (the Triton interpreter) a fixed table: few, wide programs run fastest there.

`tile_sources` says which of these each bucket's tile came from (the compiler records it for
``tiles.json`` and ``explain()``; the IR cannot carry it: its attributes are the op's own).
"""
from __future__ import annotations

import warnings

from moec.ir.graph import Graph
from moec.runtime import autotune
from moec.ir.tiles import BUCKETS, GemmTile, RouteTile, RowTile, bucket_key, bucket_ranges, merge_buckets

from . import cost_model
from .cost_model import pow2

# the interpreter's tiles (arch "cpu"): one bucket
CPU_GEMM = (16, 64, 64, 4, 1)       # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
CPU_ROUTE = (16, 64, 4, 1)          # BLOCK_T, BLOCK_K, warps, stages
CPU_ROW = (16, 128, 4, 1)           # BLOCK_T, BLOCK_D, warps, stages


def _cpu_tile(n, g):
    if n.op == "grouped_gemm":
        bm, bn, bk, w, s = CPU_GEMM
        N, K = int(n.types[0].shape[1]), int(g.types[n.ins["a"]].shape[1])
        return GemmTile(bm, min(bn, pow2(N)), min(bk, pow2(K)), w, s)
    if n.op == "fused_route":
        bt, bk, w, s = CPU_ROUTE
        return RouteTile(bt, min(bk, pow2(int(g.types[n.ins["x"]].shape[1]))), w, s)
    bt, bd, w, s = CPU_ROW
    return RowTile(bt, min(bd, pow2(int(n.types[0].shape[1]))), w, s)


def _rows(tile) -> int:
    return getattr(tile, "block_m", None) or tile.block_t


def tiles_for(n, g: Graph, arch, tuned=None) -> dict:
    """``{bound: tile}`` for one kernel node (``tuned``: an `autotune.Lookup` or None).

    Buckets are visited from the largest down; a bucket the model would serve about as well
    (within ``cost_model.NEAR_TIE``) with the next larger bucket's tile, *with the same rows per
    program*, takes that tile, so near-identical kernels are not rendered and compiled twice.
    Tiles of more rows are never carried down to smaller T: where the model calls a 128-row and
    a 16-row tile a tie (memory-bound, small T), it is least to be trusted."""
    if arch.name == "cpu":
        return {None: _cpu_tile(n, g)}
    problem = cost_model.problem_of(n, g)
    key = autotune.kernel_key(n, g) if tuned is not None else None
    chosen, larger = {}, None
    for (lo, hi), bound in reversed(list(zip(bucket_ranges(BUCKETS), BUCKETS))):
        tile, why = _tuned(tuned, key, problem, arch, lo, hi, bound)
        if why:
            warnings.warn(f"moec: tune file {tuned.path}: [{tuned.device}] {key} {bucket_key(bound)}: "
                          f"entry ignored ({why}); the cost model chooses", autotune.TuneWarning, stacklevel=2)
        if tile is None:
            tile = cost_model.choose(problem, arch, lo, hi)
            kept = cost_model.score(problem, arch, lo, hi, larger) if larger is not None else None
            if (kept is not None and _rows(larger) == _rows(tile)
                    and kept <= cost_model.score(problem, arch, lo, hi, tile) * (1 + cost_model.NEAR_TIE)):
                tile = larger
        chosen[bound] = larger = tile
    return merge_buckets(chosen)


def _tuned(tuned, key, problem, arch, lo, hi, bound):
    """The tune file's tile for one bucket: ``(tile, None)``; ``(None, None)`` when there is no
    entry; ``(None, why)`` when the entry is malformed or not a legal candidate on ``arch``."""
    if tuned is None:
        return None, None
    tile, why = tuned.entry(key, bound)
    if tile is not None and cost_model.score(problem, arch, lo, hi, tile) is None:
        return None, f"{tile} is not a legal tile on {arch.name}: it does not fit, or is off the model's grid"
    return tile, why


def tile_sources(n, g: Graph, arch, tuned=None) -> tuple[dict, list]:
    """Where each bucket's tile of a chosen kernel node came from: ``({bound: "tune file" |
    "cost model" | "interpreter table"}, [notes on ignored entries])``. A bucket's tile is the
    tune file's when it equals that bucket's usable entry (choose-tiles takes every usable one)."""
    if arch.name == "cpu":
        return {b: "interpreter table" for b in BUCKETS}, []
    tiles = n.attr["tiles"]
    key = autotune.kernel_key(n, g) if tuned is not None else None
    problem = cost_model.problem_of(n, g) if tuned is not None else None
    sources, notes = {}, []
    for (lo, hi), bound in zip(bucket_ranges(BUCKETS), BUCKETS):
        mine = next(t for b, t in tiles.items() if b is None or (hi is not None and b >= hi))
        tile, why = _tuned(tuned, key, problem, arch, lo, hi, bound)
        sources[bound] = "tune file" if tile is not None and tile == mine else "cost model"
        if why:
            notes.append(f"{n.name} {bucket_key(bound)}: tune entry ignored ({why})")
    return sources, notes


def choose_tiles(g: Graph, ctx) -> Graph:
    tuned = autotune.lookup_for(ctx.arch)
    nodes = [n.replace(attrs={"tiles": tiles_for(n, g, ctx.arch, tuned)}) if n.op in cost_model.PROBLEMS else n
             for n in g.nodes]
    return g.with_nodes(nodes)
