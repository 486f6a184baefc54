"""The cost model behind choose-tiles: the legal tiles of each kernel node on an arch, and the tile
each token-count bucket should use.

What a tile costs is in `passes/kernel_costs.py` (the forward's problems read off kernel nodes, their
FLOPs, bytes, row tiles, programs and waves as sympy expressions of T, a grouped GEMM's traffic
in its program order), `passes/grad_costs.py` (the backward's grouped GEMMs) and `passes/cost_terms.py`
(a tile's predicted time on an arch); `PROBLEMS` / `problem_of` here map a kernel node to its problem
(``cost_model.GemmProblem`` ... are re-exported). This module chooses:

- candidates (`candidates`): legal Triton tiles from a grid of powers of two per kernel family,
  clamped to the padded problem, whose pipelined shared memory and fp32 accumulators fit the
  arch (`GemmProblem.fits` ...), listed in the family's preference order;
- ranking (`rank`): a tile's score in a bucket ``lo <= T <= hi`` is the mean, over a few sample
  T of the bucket (`bucket_samples`: its ends and geometric middle), of its predicted time
  relative to the best candidate's at that T (1.0: best at every sample). Candidates within
  `NEAR_TIE` of the best score are ties, settled by the preference order (for GEMMs: most K in
  flight, deeper K, narrower N, fewer rows, fewer warps; in the unbounded bucket the widest output
  tile first, then the tallest; in the decode bucket the shortest, then the narrowest, first (more
  programs in flight); of one tile's program orders, the one with the least traffic): the model is
  not finer than that;
- `choose`: the first of the ranking; `score`: a given tile's score (None: not a candidate, e.g.
  a hand-edited autotune entry that does not fit); `describe`: the sympy expressions of a
  problem with a tile, for docs and tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import sympy

from moec.runtime.arch import Arch
from moec.ir.tiles import BUCKETS, GemmTile, RouteTile, RowTile

from .cost_terms import (DRAM_LATENCY_S, ITER_S, L2_OVER_DRAM, L2_SHARE, LINE_BYTES, MAX_ACC_REGS,  # noqa: F401
                         SLOW_MMA, SMEM_RESERVE, TCGEN05_HALF, WAVE_LATENCIES, Num, Sym, mma_efficiency, pow2)
from .grad_costs import DgradProblem, WgradProblem, wgrad_candidates
from .kernel_costs import GemmProblem, NormProblem, RouteProblem, RowProblem

# the problem of each kernel op the cost model tiles (MoBA's kernels take table tiles: passes/moba_tiles.py)
PROBLEMS = {"grouped_gemm": GemmProblem, "fused_route": RouteProblem, "reduce_topk": RowProblem,
            "expert_norm": NormProblem,
            "grouped_dgrad": DgradProblem, "grouped_wgrad": WgradProblem}


def problem_of(n, g):
    """The cost-model problem of a kernel node."""
    return PROBLEMS[n.op].of(n, g)

# candidate grids (powers of two >= 16 for tl.dot dims); near-ties are broken by each family's
# preference order (`candidates`)
GEMM_BM = (16, 32, 64, 128)
GEMM_BN = (16, 32, 64, 128, 256)
GEMM_BK = (16, 32, 64, 128, 256)
GEMM_GROUPS = (8, 4, 16, 32, 64, 1)   # group_m (program order), in preference order
WARPS = (4, 8)
GEMM_STAGES = (2, 3, 4, 5)
ROUTE_BT = (16, 32, 64)
ROUTE_BK = (128, 64, 256, 32, 16)
ROUTE_STAGES = (3, 2, 4)
ROW_BT = (1, 2, 4, 8, 16, 32)
ROW_BD = (128, 256, 512, 1024, 64, 32, 16)
NEAR_TIE = 0.02              # scores within 2% of the best are a tie: the model is not finer than that


# ---- candidates -------------------------------------------------------------------------------

def gemm_candidates(p: GemmProblem, arch: Arch) -> list[GemmTile]:
    """Legal tiles in preference order: blocks clamped to the padded problem, 8 warps only
    for tiles of at least 128 x 128 outputs, K chunks of whole 128-byte lines (K is the contiguous
    dim of both operands), the accumulators in registers, shared memory fitting; each with every
    program order of ``GEMM_GROUPS``; on wgmma / tcgen05 arches (sm90, sm100), a forward grouped GEMM's
    fast-MMA tiles also persistent (``persistent`` = the programs per SM its occupancy allows).
    Preference (for near-ties): the most K in flight (``(stages - 1) * BLOCK_K``), then deeper
    K, then narrower N, fewer rows, fewer warps, then ``GEMM_GROUPS``' order, one program per tile
    before persistent."""
    bn_max, bk_max = pow2(p.n), pow2(p.k)
    bk_min = min(bk_max, LINE_BYTES // p.in_size)
    persistent = type(p) is GemmProblem and arch.mma in ("wgmma", "tcgen05")   # (the backward's: not built)
    out = []
    for bm in GEMM_BM:
        for bn in (b for b in GEMM_BN if b <= bn_max):
            for bk in (b for b in GEMM_BK if bk_min <= b <= bk_max):
                for w in WARPS:
                    if w == 8 and bm * bn * p.mats < 128 * 128:
                        continue
                    for s in GEMM_STAGES:
                        tile = GemmTile(bm, bn, bk, w, s)
                        if p.fits(tile, arch):
                            out += [GemmTile(bm, bn, bk, w, s, g) for g in GEMM_GROUPS]
                            if persistent and bm >= arch.fast_mma_min_m:
                                per_sm = p.slots(tile, arch) // arch.sms
                                out += [GemmTile(bm, bn, bk, w, s, g, per_sm) for g in GEMM_GROUPS]
    return sorted(out, key=lambda t: (-(max(t.num_stages - 1, 1) * t.block_k), -t.block_k, t.block_n,
                                      t.block_m, t.num_warps, GEMM_GROUPS.index(t.group_m), t.persistent))


def route_candidates(p: RouteProblem, arch: Arch) -> list[RouteTile]:
    """Legal routing tiles: K chunks of whole lines up to the padded hidden size, fitting;
    preference: the grid order (BLOCK_T, then BLOCK_K as listed in ``ROUTE_BK``, warps, stages)."""
    out = []
    bk_max = pow2(p.hidden)
    bk_min = min(bk_max, LINE_BYTES // p.in_size)
    for bt in ROUTE_BT:
        for bk in (b for b in ROUTE_BK if bk_min <= b <= bk_max):
            for w in WARPS:
                for s in ROUTE_STAGES if p.hidden else (1,):     # given logits: no K loop to pipeline
                    tile = RouteTile(bt, bk, w, s)
                    if p.fits(tile, arch):
                        out.append(tile)
    return out


def row_candidates(p: RowProblem, arch: Arch) -> list[RowTile]:
    """Legal reduce tiles (at most 32 fp32 accumulators a thread); preference: the grid order."""
    bd_max = pow2(p.hidden)
    return [RowTile(bt, bd, 4, 1) for bt in ROW_BT for bd in ROW_BD
            if bd <= bd_max and p.fits(RowTile(bt, bd, 4, 1), arch)]


CANDIDATES = {GemmProblem: gemm_candidates, DgradProblem: gemm_candidates, RouteProblem: route_candidates,
              RowProblem: row_candidates, NormProblem: row_candidates, WgradProblem: wgrad_candidates}


def candidates(problem, arch: Arch) -> list:
    """Legal tiles of ``problem`` on ``arch``, in its family's preference order."""
    return CANDIDATES[type(problem)](problem, arch)


def bucket_samples(lo: int, hi: Optional[int]) -> tuple[int, ...]:
    """Token counts at which a bucket ``lo <= T <= hi`` is scored: its ends and geometric middle."""
    if hi is None:
        return (max(lo, 2048), max(lo, 4096), max(lo, 16384))
    return tuple(sorted({lo, max(lo, round(math.sqrt(lo * hi))), hi}))


# ---- choosing -------------------------------------------------------------------------------

def rank(problem, arch: Arch, lo: int, hi: Optional[int]) -> list[tuple[float, object]]:
    """``(score, tile)`` for every candidate, best first: score = mean over the bucket's sample T
    of the tile's predicted time over the best tile's (1.0: best at every sample)."""
    return list(_rank(problem, arch, lo, hi))


@functools.lru_cache(maxsize=512)
def _rank(problem, arch: Arch, lo: int, hi: Optional[int]) -> tuple:
    if min(arch.dram_gbps, arch.bf16_tflops, arch.fp32_tflops, arch.l2_bytes) <= 0:
        raise ValueError(f"arch {arch.name} lacks the facts the cost model needs "
                         "(bf16_tflops, fp32_tflops, dram_gbps, l2_bytes)")
    cands = candidates(problem, arch)
    if not cands:
        raise ValueError(f"no tile of {problem.key} fits {arch.name}")
    samples = bucket_samples(lo, hi)
    times = [[problem.time(c, arch, t) for t in samples] for c in cands]
    best = [min(col) or 1e-30 for col in zip(*times)]
    scores = [sum(x / b for x, b in zip(row, best)) / len(samples) for row in times]
    top = min(scores)
    # near-ties keep the candidates' preference order, except that at large T (every sample past
    # the last bounded bucket) wider output tiles come first, then taller ones: the model is then
    # compute-bound for most tiles and misses the shared-memory and issue cost of re-loading operands for
    # small ones (a taller tile reads its expert's weights fewer times); and at decode (the first bucket)
    # shorter tiles come first (an expert has a row or two there: a taller tile only multiplies padding),
    # then narrower ones (more programs keep more of the weights' bytes in flight).
    # Of one tile's program orders, the one that moves the fewest bytes (the model overlaps memory
    # with compute perfectly: traffic a compute-bound tile hides in the model costs on a GPU).
    # The rest go by score.
    first = {}
    for i, c in enumerate(cands):
        first.setdefault(without_order(c), i)
    gemm = isinstance(problem, (GemmProblem, WgradProblem))
    wide_first = isinstance(problem, GemmProblem) and hi is None
    short_first = isinstance(problem, GemmProblem) and hi is not None and hi <= BUCKETS[0]

    def key(i):
        c = cands[i]
        if scores[i] <= top * (1 + NEAR_TIE):     # only near-ties need their traffic
            traffic = sum(problem.traffic(c, arch, t) for t in samples) if gemm else 0.0
            shape = ((-c.block_m * c.block_n, -c.block_m) if wide_first else (c.block_m, c.block_n) if short_first
                     else (0, 0))
            return (0, *shape, first[without_order(c)], traffic, i)
        return (1, scores[i], 0, 0, 0.0, i)
    order = sorted(range(len(cands)), key=key)
    return tuple((scores[i], cands[i]) for i in order)


def without_order(tile):
    """A tile without its program order (grouped GEMM tiles differ only in ``group_m``)."""
    return dataclasses.replace(tile, group_m=0) if isinstance(tile, GemmTile) else tile


def score(problem, arch: Arch, lo: int, hi: Optional[int], tile) -> Optional[float]:
    """``tile``'s score in the bucket (1.0: best at every sample; None: not a candidate)."""
    return next((s for s, t in _rank(problem, arch, lo, hi) if t == tile), None)


def choose(problem, arch: Arch, lo: int, hi: Optional[int]):
    """The model's tile for the bucket ``lo <= T <= hi`` (``hi`` None: unbounded)."""
    return _rank(problem, arch, lo, hi)[0][1]


def describe(problem, tile, arch: Arch, loads=None) -> dict:
    """The sympy expressions of T for ``problem`` with ``tile`` on ``arch`` (for docs and tests);
    for a grouped GEMM with ``loads`` (e.g. ``problem.load_symbols()``), of T and those loads."""
    if not isinstance(problem, GemmProblem):
        if loads is not None:
            raise ValueError(f"{problem.key} has no per-expert loads")
        return {"flops": sympy.sympify(problem.flops()), "bytes": sympy.sympify(problem.bytes()),
                "programs": sympy.sympify(problem.programs(tile)), "waves": sympy.sympify(problem.waves(tile, arch))}
    return {"flops": sympy.sympify(problem.flops(loads=loads)), "bytes": sympy.sympify(problem.bytes(loads=loads)),
            "programs": sympy.sympify(problem.programs(tile, loads=loads)),
            "waves": sympy.sympify(problem.waves(tile, arch, loads=loads)),
            "hit_experts": sympy.sympify(problem.hit_experts(loads=loads)),
            "row_tiles": sympy.sympify(problem.row_tiles(tile, loads=loads))}
