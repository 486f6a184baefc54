"""choose-tiles: attach to every kernel node the tile of each token-count bucket, and where it came from.

Expects: kernel nodes (ops with a ``tiles`` attribute: ``fused_route``, ``grouped_gemm``,
``reduce_topk``, the backward's ``grouped_dgrad`` and ``grouped_wgrad``, and MoBA's ``fused_block_gate``,
``block_sparse_attention``), ``ctx.arch`` and ``ctx.tuned`` (the
tune file's entries for this device, or None).
Guarantees: each has a ``tiles`` attribute ``{bound: tile}`` over the buckets of
`moec.ir.tiles.BUCKETS` (``T <= 16``, ``<= 128``, ``<= 1024``, larger: ``None``), with
adjacent buckets that got the same tile folded into one (``{None: tile}`` serves every T), and a
``tile_source`` attribute saying where the tiles came from: one string when every bucket's came from
the same place, else ``{bucket bound: source}`` over all of `BUCKETS`, and, when tune file entries
were ignored, ``tune_ignored={bucket bound: why}``. Blocks are powers of two no
wider than the padded problem dims; on a GPU arch each tile's pipelined shared memory fits the arch's
per-block limit and its accumulators fit in registers.

Where a tile comes from, per bucket (the source names):

1. ``"tune file"``: the autotune file (``ctx.tuned``, `moec.runtime.tune_file`), when it has an entry
   for this device, kernel (`kernel_key`) and bucket, and the entry is one of the cost model's legal
   candidates on this arch; an entry that is malformed or not legal here is ignored with a
   `TuneWarning` naming it (never silently) and recorded in ``tune_ignored``;
2. ``"cost model"`` (`passes/cost_model.py`): the candidate with the least predicted time over the
   bucket's sample token counts;
3. ``"interpreter table"`` on ``cpu`` (the Triton interpreter): few, wide programs run fastest there;
4. ``"table"`` for MoBA's kernels, which the cost model does not model yet (`passes/moba_tiles.py`): one
   tile for every T.

The pass is pure: the tune file is read by the compile driver and handed in through ``ctx``.
"""
from __future__ import annotations

import warnings

from moec.ir.graph import Graph
from moec.ir.ops import is_kernel
from moec.ir.tiles import BUCKETS, GemmTile, RouteTile, RowTile, bucket_key, bucket_ranges, merge_buckets, pow2
from moec.runtime.tune_file import TuneWarning

from . import cost_model
from .moba_tiles import moba_tile

# the interpreter's tiles (arch "cpu"): one bucket
CPU_GEMM = (16, 64, 64, 4, 1)       # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages (grouped_gemm, grouped_dgrad)
CPU_WGRAD = (64, 64, 64, 4, 1)      # BLOCK_M rows reduced, a BLOCK_N x BLOCK_K gradient tile
CPU_ROUTE = (16, 64, 4, 1)          # BLOCK_T, BLOCK_K, warps, stages
CPU_ROW = (16, 128, 4, 1)           # BLOCK_T, BLOCK_D, warps, stages


def _cpu_tile(n, g):
    if n.op in ("grouped_gemm", "grouped_dgrad"):
        bm, bn, bk, w, s = CPU_GEMM
        N, K = int(n.types[0].shape[1]), int(g.types[n.ins["a"]].shape[1])
        return GemmTile(bm, min(bn, pow2(N)), min(bk, pow2(K)), w, s)
    if n.op == "grouped_wgrad":
        bm, bn, bk, w, s = CPU_WGRAD
        return GemmTile(bm, min(bn, pow2(int(n.types[0].shape[1]))), min(bk, pow2(int(n.types[0].shape[2]))), w, s)
    if n.op == "fused_route":
        bt, bk, w, s = CPU_ROUTE
        hidden = int(g.types[n.ins["x"]].shape[1]) if "x" in n.ins else 0      # 0: given logits, no GEMM
        return RouteTile(bt, min(bk, pow2(hidden)), w, s)
    bt, bd, w, s = CPU_ROW
    return RowTile(bt, min(bd, pow2(int(n.types[0].shape[1]))), w, s)


def _rows(tile) -> int:
    return getattr(tile, "block_m", None) or tile.block_t


def tiles_for(n, g: Graph, arch, tuned=None) -> tuple[dict, dict, dict]:
    """``({bound: tile}, {bound: source}, {bound: why a tune entry was ignored})`` for one kernel node
    of the cost model (``tuned``: a `tune_file.Lookup` or None); sources per bucket of `BUCKETS`, tiles
    folded.

    Buckets are visited from the largest down; a bucket the model would serve about as well
    (within ``cost_model.NEAR_TIE``) with the next larger bucket's tile, *with the same rows per
    program*, takes that tile, so near-identical kernels are not rendered and compiled twice.
    Tiles of more rows are never carried down to smaller T: where the model calls a 128-row and
    a 16-row tile a tie (memory-bound, small T), it is least to be trusted."""
    if arch.name == "cpu":
        return {None: _cpu_tile(n, g)}, {None: "interpreter table"}, {}
    problem = cost_model.problem_of(n, g)
    key = kernel_key(n, g) if tuned is not None else None
    chosen, sources, ignored, larger = {}, {}, {}, None
    for (lo, hi), bound in reversed(list(zip(bucket_ranges(BUCKETS), BUCKETS))):
        tile, why = _tuned(tuned, key, problem, arch, lo, hi, bound)
        sources[bound] = "tune file" if tile is not None else "cost model"
        if why:
            warnings.warn(f"moec: tune file {tuned.path}: [{tuned.device}] {key} {bucket_key(bound)}: "
                          f"entry ignored ({why}); the cost model chooses", TuneWarning, stacklevel=2)
            ignored[bound] = why
        if tile is None:
            tile = cost_model.choose(problem, arch, lo, hi)
            kept = cost_model.score(problem, arch, lo, hi, larger) if larger is not None else None
            if (kept is not None and _rows(larger) == _rows(tile)
                    and kept <= cost_model.score(problem, arch, lo, hi, tile) * (1 + cost_model.NEAR_TIE)):
                tile = larger
        chosen[bound] = larger = tile
    return merge_buckets(chosen), {b: sources[b] for b in BUCKETS}, {b: ignored[b] for b in BUCKETS if b in ignored}


def _tuned(tuned, key, problem, arch, lo, hi, bound):
    """The tune file's tile for one bucket: ``(tile, None)``; ``(None, None)`` when there is no
    entry; ``(None, why)`` when the entry is malformed or not a legal candidate on ``arch``."""
    if tuned is None:
        return None, None
    tile, why = tuned.entry(key, bound)
    if tile is not None and cost_model.score(problem, arch, lo, hi, tile) is None:
        return None, f"{tile} is not a legal tile on {arch.name}: it does not fit, or is off the model's grid"
    return tile, why


def _source_attr(sources: dict):
    """One string when every bucket's tile came from the same place, else the dict."""
    values = set(sources.values())
    return values.pop() if len(values) == 1 else sources


def choose_tiles(g: Graph, ctx) -> Graph:
    nodes = []
    for n in g.nodes:
        if is_kernel(n.op):
            if n.op in cost_model.PROBLEMS:
                tiles, sources, ignored = tiles_for(n, g, ctx.arch, ctx.tuned)
            else:
                bs, D = n.attr["block_size"], int(g.types[n.ins["q"]].shape[3])
                size = 4 if g.types[n.ins["q"]].dtype == "f32" else 2
                tile = moba_tile(n.op, bs, D, ctx.arch, size, n.attr.get("scheme", "rows"))
                tiles, sources, ignored = {None: tile}, {None: "table"}, {}
            n = n.replace(attrs={"tiles": tiles, "tile_source": _source_attr(sources), "tune_ignored": ignored or None})
        nodes.append(n)
    return g.with_nodes(nodes)


# ---- the tune file's key of a kernel node --------------------------------------------------------

# node attributes the problem key already names, and optional operands it implies
# (schedule-tiles' schedule, which runs after choose-tiles, changes where a tile's rows are read from, not its cost)
_IN_PROBLEM_KEY = {"tiles", "tile_source", "tune_ignored", "num_experts", "top_k", "glu", "gather_top_k", "scatter", "out_dtype",
                   "noisy", "schedule_block_m"}
_IMPLIED_OPERANDS = {"offsets", "w_up", "order", "scale", "w_noise", "residual", "schedule"}


def _attr_text(name: str, v) -> str:
    if v is True:
        return name
    return f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}"


def kernel_key(node, graph) -> str:
    """The tune file's key of a kernel node: the cost model's problem key (shape, rows per token,
    dtypes, fused gather/scatter/scale), then every other attribute of the node that is set (False
    and None ones omitted, sorted) and the optional operands it reads (``+b``): whatever changes
    the generated kernel. Two nodes with one key run the same kernel on the same shapes."""
    bits = [cost_model.problem_of(node, graph).key]
    bits += [_attr_text(k, v) for k, v in sorted(node.attr.items())
             if k not in _IN_PROBLEM_KEY and v is not None and v is not False]
    required = set(node.opdef.operands)
    bits += [f"+{r}" for r in sorted(node.ins) if r not in required and r not in _IMPLIED_OPERANDS]
    return " ".join(bits)
