"""What each kernel node costs: the problems behind choose-tiles, as sympy expressions of T, and
a tile's predicted time on an arch. `passes/cost_model.py` ranks the legal tiles with it.

Every kernel node becomes a *problem* (`GemmProblem`, `RouteProblem`, `RowProblem`) read off its
IR types. A problem gives, as sympy expressions of the token count ``T``:

- ``flops``  the useful floating-point work (``2 M N K``, twice that with a GLU);
- ``bytes``  the fewest bytes the kernel must move through device memory: each input read once,
  each output written once, and **only the weights of the experts that are hit**;
- for a tile: ``row_tiles``, ``programs`` (the grid that does work) and ``waves``
  (``ceiling(programs / resident slots)``, slots = SMs x CTAs per SM, the latter limited by
  shared memory, registers and threads).

Routing assumption (grouped GEMMs). Routing is data: at compile time only the pair count
``M = k T`` is known. The model assumes uniform routing, each pair's expert equally likely, and
counts ``hit = Min(E, M)`` experts touched, each with ``M / hit`` rows, so weight bytes are
``hit * N * K`` and row tiles ``hit * ceiling(M / (hit * BLOCK_M))``. ``Min(E, M)`` is an upper
bound of the expected number of distinct experts (``E (1 - (1 - 1/E)^M)``): the model errs on
the side of more weight traffic and more, emptier tiles for small T, and is exact for large T.
Skewed routing (a few hot experts) has fewer, fuller tiles than assumed. Given the per-expert
loads ``n_e`` (numbers, or the sympy symbols of `GemmProblem.load_symbols`), the same quantities
are exact in them: ``rows = sum n_e``, ``hit = sum Min(1, n_e)``, ``row_tiles = sum
ceiling(n_e / BLOCK_M)`` (``loads=`` on each method; `cost_model.describe` too), so a benchmark can
set the prediction for the routing it measured beside the time it measured.

Program order and L2 (grouped GEMMs, `GemmProblem.traffic`). ``bytes`` reads each operand once;
a tile's programs may read more. Programs run ``slots`` at a time in the grid's grouped order
(``group_m`` row tiles fastest, then the N tiles; `moec.ir.tiles.GemmTile`), and an operand
is fetched again when the programs that share it do not run close enough in time for it to stay
in L2 (`L2_SHARE` of the arch's ``l2_bytes`` per operand):

- activations: a group's rows (``group_m * BLOCK_M * K``) are read once if they fit, else once
  per wave that sweeps them: ``cols * min(group_m, slots) / slots`` times (``cols`` N tiles);
  rows fastest over the whole grid re-reads them once per N tile;
- weights: an expert's ``[N, K]`` (two with a GLU) is read once if it fits, else once per group
  of row tiles of that expert: ``ceiling(tiles_per_expert / max(group_m, slots // cols))``.

That is the trade grouping settles: small groups re-read weights, large ones activations. At
decode every expert has one row tile and the order does not matter.

How long a tile takes (waves, the tensor-core, memory and L2 terms) is `passes/cost_terms.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from moec.ir.graph import Graph, Node
from moec.ir.types import T
from moec.runtime.arch import Arch
from moec.runtime.grouped_gemm_kernel import row_tile_bound
from moec.ir.tiles import GemmTile, RouteTile, RowTile

from .cost_terms import (L2_SHARE, MAX_ACC_REGS, MAX_SYNC_REGS, SMEM_RESERVE, Num, Sym, cdiv, itemsize, mma_efficiency,
                         expected_tiles, occupancy, per_token, pipeline_buffers, pow2, sync_mma, sync_regs,
                         waves_time)


# ---- the grouped GEMM -----------------------------------------------------------------------

@dataclass(frozen=True)
class GemmProblem:
    """A ``grouped_gemm`` node: ``M = rows_per_token * T`` rows, each times its expert's
    ``[N, K]`` weight (two with ``glu``)."""

    experts: int             # E (1 for a dense / shared-expert GEMM)
    routed: bool             # rows grouped by expert (an offsets operand)
    rows_per_token: int      # M = rows_per_token * T
    a_rows_per_token: int    # rows of the ``a`` operand per token (1 when gathering)
    n: int
    k: int
    glu: bool
    in_size: int             # bytes per element of a and w
    out_size: int
    fp32: bool               # fp32 operands: the exact (ieee) FMA path, no tensor cores
    indexed: bool            # reads the order vector (gather or scatter)
    scale: bool              # reads a per-row fp32 scale
    dtype: str = ""
    out_dtype: str = ""
    gather_top_k: int = 0
    scatter: bool = False
    pre: int = 0             # pre-activation outputs stored besides out (a training forward that saves them)

    @classmethod
    def of(cls, n: Node, g: Graph) -> "GemmProblem":
        a_t, out_t = g.types[n.ins["a"]], n.types[0]
        a = n.attr
        return cls(experts=a["num_experts"], routed="offsets" in n.ins,
                   rows_per_token=per_token(out_t.shape[0]), a_rows_per_token=per_token(a_t.shape[0]),
                   n=int(out_t.shape[1]), k=int(a_t.shape[1]), glu=bool(a["glu"]),
                   in_size=itemsize(a_t.dtype), out_size=itemsize(out_t.dtype), fp32=a_t.dtype == "f32",
                   indexed=bool(a["gather_top_k"] or a["scatter"]), scale="scale" in n.ins,
                   dtype=a_t.dtype, out_dtype=out_t.dtype, gather_top_k=a["gather_top_k"],
                   scatter=bool(a["scatter"]), pre=sum(r in n.outs for r in ("pre", "pre_up")))

    @property
    def key(self) -> str:
        """Names everything of the problem that changes the kernel or its cost (the autotune
        file's key, with `moec.passes.choose_tiles.kernel_key`'s node attributes): ``M=2T`` rows
        (rows per token: top-k of a routed GEMM), ``A=T`` rows of the ``a`` operand when it
        differs, ``dense`` (no expert offsets), the GLU, gather, scatter, the per-row scale."""
        m = f"{self.rows_per_token}T" if self.rows_per_token != 1 else "T"
        bits = [f"grouped_gemm E={self.experts} M={m} N={self.n} K={self.k}"]
        if self.a_rows_per_token != self.rows_per_token and not self.gather_top_k:
            bits.append(f"A={self.a_rows_per_token}T")
        if not self.routed:
            bits.append("dense")
        if self.glu:
            bits.append("glu")
        if self.gather_top_k:
            bits.append(f"gather={self.gather_top_k}")
        if self.scatter:
            bits.append("scatter")
        if self.scale:
            bits.append("scale")
        if self.pre:
            bits.append("pre")
        bits.append(f"{self.dtype}->{self.out_dtype}")
        return " ".join(bits)

    @property
    def mats(self) -> int:
        return 2 if self.glu else 1

    # -- sympy expressions of T (also evaluated numerically with ops=Num and an int t). With
    # ``loads`` (each expert's rows: ints, or sympy symbols such as `load_symbols`) the expressions
    # count those loads instead of the uniform-routing assumption.
    def load_symbols(self) -> tuple:
        """``n_0 .. n_{E-1}``: the rows each expert gets, as sympy symbols."""
        return sympy.symbols(f"n_0:{self.experts}", integer=True, nonnegative=True)

    def rows(self, t=T, loads=None):
        return sum(loads) if loads is not None else self.rows_per_token * t

    def hit_experts(self, t=T, ops=Sym, loads=None):
        if loads is not None:
            return sum(ops.min(1, n) for n in loads)
        return ops.min(self.experts if self.routed else 1, self.rows(t))

    def flops(self, t=T, loads=None):
        return 2 * self.rows(t, loads) * self.n * self.k * self.mats

    def bytes(self, t=T, ops=Sym, loads=None):
        M = self.rows(t, loads)
        b = self.a_rows_per_token * t * self.k * self.in_size              # activations, read once
        b += self.hit_experts(t, ops, loads) * self.mats * self.n * self.k * self.in_size   # hit experts' weights
        b += M * self.n * (self.out_size + self.pre * self.in_size)         # output (and saved pre-activations)
        b += 4 * M * (int(self.indexed) + int(self.scale))                  # order, scale vectors
        return b

    def row_tiles(self, tile: GemmTile, t=T, ops=Sym, loads=None):
        if loads is not None:
            return sum(ops.ceil_div(n, tile.block_m) for n in loads)
        M = self.rows(t)
        if not self.routed:
            return ops.ceil_div(M, tile.block_m)
        hit = self.hit_experts(t, ops)
        return hit * ops.ceil_div(M, ops.max(hit, 1) * tile.block_m)

    def programs(self, tile: GemmTile, t=T, ops=Sym, loads=None):
        return self.row_tiles(tile, t, ops, loads) * cdiv(self.n, tile.block_n)

    def waves(self, tile: GemmTile, arch: Arch, t=T, ops=Sym, loads=None):
        return ops.ceil_div(self.programs(tile, t, ops, loads), self.slots(tile, arch))

    def traffic(self, tile: GemmTile, arch: Arch, t: int, loads=None) -> float:
        """Bytes moved from device memory at ``T = t`` in the tile's program order: ``bytes``
        plus the re-reads of activations and weights (see the module docstring)."""
        floor = float(self.bytes(t, Num, loads))
        rows = self.row_tiles(tile, t, Num, loads)
        if rows == 0:
            return floor
        cols, slots = cdiv(self.n, tile.block_n), self.slots(tile, arch)
        share = arch.l2_bytes * L2_SHARE
        group = min(tile.group_m, rows)
        a_total = self.a_rows_per_token * t * self.k * self.in_size
        a_group = group * tile.block_m * self.k * self.in_size
        a_reads = 1.0 if min(a_total, a_group) <= share else max(1.0, cols * min(group, slots) / slots)
        w_expert = self.mats * self.n * self.k * self.in_size
        sharing = max(group, min(rows, slots // cols))        # row tiles that read a weight column together
        if loads is not None:
            per_expert = [cdiv(n, tile.block_m) for n in loads if n]
        else:
            hit = self.hit_experts(t, Num)
            per_expert = [rows / hit] * hit
        w_extra = 0 if w_expert <= share else sum(max(1, math.ceil(n / sharing)) - 1 for n in per_expert)
        return floor + (a_reads - 1) * a_total + w_extra * w_expert

    # -- per-tile facts
    def stage_bytes(self, tile: GemmTile) -> int:
        return (tile.block_m + self.mats * tile.block_n) * tile.block_k * self.in_size

    def smem(self, tile: GemmTile, arch: Arch) -> int:
        return pipeline_buffers(tile.num_stages, tile.block_m, arch) * self.stage_bytes(tile)

    def acc_regs(self, tile: GemmTile) -> float:
        return self.mats * tile.block_m * tile.block_n / (32 * tile.num_warps)

    def slots(self, tile: GemmTile, arch: Arch) -> int:
        return arch.sms * occupancy(self.smem(tile, arch), tile.num_warps, self.acc_regs(tile), arch)

    def fits(self, tile: GemmTile, arch: Arch) -> bool:
        return (self.smem(tile, arch) + SMEM_RESERVE <= arch.smem_per_block
                and self.acc_regs(tile) <= MAX_ACC_REGS
                and (self.fp32 or not sync_mma(tile.block_m, arch)
                     or sync_regs(self.acc_regs(tile), self.stage_bytes(tile), tile.num_warps) <= MAX_SYNC_REGS))

    def launched_row_tiles(self, tile: GemmTile, t: int) -> int:
        """Row tiles the grid launches (the runtime's data-independent bound)."""
        return row_tile_bound(self.rows(t), self.experts, tile.block_m, self.routed)

    def expected_row_tiles(self, tile: GemmTile, t: int, loads=None) -> int:
        """Row tiles the time counts: ``row_tiles`` for given loads or a dense GEMM; under uniform routing
        with every expert hit (``M >= 4 E``), their expectation over the spread of the per-expert loads
        (`cost_terms.expected_tiles`), which ``row_tiles``' mean load misses: each expert's last tile is
        padded. (Fewer pairs: ``row_tiles``, whose ``Min(E, M)`` hit experts the weight bytes count too.)"""
        if loads is not None or not self.routed or self.rows(t) < 4 * self.experts:
            return self.row_tiles(tile, t, Num, loads)
        return math.ceil(expected_tiles(self.rows(t), self.experts, tile.block_m) - 1e-6)

    def loaded_rows(self, tile: GemmTile, t: int, loads=None) -> float:
        """Rows a tile loads on average at ``T = t``: ``min(BLOCK_M, M / row_tiles)`` (rows past
        an expert's last pair are masked, never fetched)."""
        tiles = self.expected_row_tiles(tile, t, loads)
        return min(tile.block_m, self.rows(t, loads) / tiles) if tiles else tile.block_m

    def time(self, tile: GemmTile, arch: Arch, t: int, loads=None) -> float:
        """Predicted seconds at ``T = t`` (see the module docstring), for the uniform-routing
        assumption or the given per-expert ``loads``."""
        cols = cdiv(self.n, tile.block_n)
        programs = self.expected_row_tiles(tile, t, loads) * cols
        surplus = max(0, self.launched_row_tiles(tile, t) * cols - programs)
        k_pad = cdiv(self.k, tile.block_k) * tile.block_k
        peak = (arch.fp32_tflops if self.fp32 else arch.bf16_tflops) * 1e12
        rate = peak * mma_efficiency(tile.block_m, arch, self.fp32)
        loaded = (self.loaded_rows(tile, t, loads) + self.mats * tile.block_n) * self.in_size   # bytes per unit of K
        in_flight = max(tile.num_stages - 1, 1) * loaded * tile.block_k
        return waves_time(programs, self.slots(tile, arch), arch,
                           flops_per_program=2 * tile.block_m * tile.block_n * k_pad * self.mats,
                           dram_total=self.traffic(tile, arch, t, loads), l2_per_program=loaded * k_pad,
                           in_flight=in_flight, flops_rate=rate, iters=k_pad // tile.block_k,
                           persistent=bool(tile.persistent), surplus=surplus)


# ---- the routing kernel ---------------------------------------------------------------------

@dataclass(frozen=True)
class RouteProblem:
    """A ``fused_route`` node: ``[T, d] @ [d, E_PAD]`` logits (twice with noise), then top-k."""

    experts: int
    top_k: int
    hidden: int
    in_size: int
    fp32: bool
    mats: int = 1            # 2 with the noise projection
    dtype: str = ""

    @classmethod
    def of(cls, n: Node, g: Graph) -> "RouteProblem":
        if "logits" in n.ins:           # given logits: no GEMM (hidden 0), the fp32 tile read once
            return cls(experts=n.attr["num_experts"], top_k=n.attr["top_k"], hidden=0, in_size=4, fp32=True,
                       dtype="f32")
        x_t = g.types[n.ins["x"]]
        return cls(experts=n.attr["num_experts"], top_k=n.attr["top_k"], hidden=int(x_t.shape[1]),
                   in_size=itemsize(x_t.dtype), fp32=x_t.dtype == "f32",
                   mats=2 if "w_noise" in n.ins else 1, dtype=x_t.dtype)

    @property
    def key(self) -> str:
        if not self.hidden:
            return f"fused_route E={self.experts} k={self.top_k} logits given"
        return f"fused_route E={self.experts} k={self.top_k} d={self.hidden}{' noisy' if self.mats == 2 else ''} {self.dtype}"

    @property
    def e_pad(self) -> int:
        return pow2(self.experts)

    def flops(self, t=T):
        return 2 * t * self.hidden * self.e_pad * self.mats

    def bytes(self, t=T, ops=Sym):
        if not self.hidden:             # given logits: read the [T, E] tile
            return t * self.experts * 4 + t * self.top_k * 8 + 4 * self.experts
        return (t * self.hidden * self.in_size + self.mats * self.experts * self.hidden * self.in_size
                + t * self.top_k * 8 + 4 * self.experts)

    def programs(self, tile: RouteTile, t=T, ops=Sym):
        return ops.ceil_div(t, tile.block_t)

    def waves(self, tile: RouteTile, arch: Arch, t=T, ops=Sym):
        return ops.ceil_div(self.programs(tile, t, ops), self.slots(tile, arch))

    def block_k(self, tile: RouteTile) -> int:
        return min(tile.block_k, pow2(self.hidden))

    def stage_bytes(self, tile: RouteTile) -> int:
        if not self.hidden:             # no pipelined GEMM: the logits tile, loaded once
            return tile.block_t * self.e_pad * self.in_size
        return (tile.block_t + self.mats * self.e_pad) * self.block_k(tile) * self.in_size

    def smem(self, tile: RouteTile, arch: Arch) -> int:
        return pipeline_buffers(tile.num_stages, tile.block_t, arch) * self.stage_bytes(tile)

    def acc_regs(self, tile: RouteTile) -> float:
        # logits, selection keys and scores of the [BLOCK_T, E_PAD] tile live in registers at once
        return 3 * self.mats * tile.block_t * self.e_pad / (32 * tile.num_warps)

    def slots(self, tile: RouteTile, arch: Arch) -> int:
        return arch.sms * occupancy(self.smem(tile, arch), tile.num_warps, self.acc_regs(tile), arch)

    def fits(self, tile: RouteTile, arch: Arch) -> bool:
        return (self.smem(tile, arch) + SMEM_RESERVE <= arch.smem_per_block
                and self.acc_regs(tile) <= MAX_ACC_REGS)

    def time(self, tile: RouteTile, arch: Arch, t: int) -> float:
        bk = self.block_k(tile)
        k_pad = cdiv(self.hidden, bk) * bk
        peak = (arch.fp32_tflops if self.fp32 else arch.bf16_tflops) * 1e12
        return waves_time(self.programs(tile, t, Num), self.slots(tile, arch), arch,
                           flops_per_program=2 * tile.block_t * self.e_pad * k_pad * self.mats,
                           dram_total=self.bytes(t, Num),
                           l2_per_program=(tile.block_t + self.mats * self.e_pad) * k_pad * self.in_size,
                           in_flight=max(tile.num_stages - 1, 1) * self.stage_bytes(tile),
                           flops_rate=peak * mma_efficiency(tile.block_t, arch, self.fp32),
                           iters=k_pad // bk)


# ---- the top-k reduce -----------------------------------------------------------------------

@dataclass(frozen=True)
class RowProblem:
    """A ``reduce_topk`` node: ``T`` rows of ``k`` pair rows (the layer's dtype) summed in fp32 (+ a residual)."""

    top_k: int
    hidden: int
    y_size: int
    out_size: int
    residual: bool
    dtype: str = ""

    @classmethod
    def of(cls, n: Node, g: Graph) -> "RowProblem":
        y_t = g.types[n.ins["y"]]
        return cls(top_k=n.attr["top_k"], hidden=int(n.types[0].shape[1]), y_size=itemsize(y_t.dtype),
                   out_size=itemsize(n.types[0].dtype), residual="residual" in n.ins,
                   dtype=f"{y_t.dtype}->{n.types[0].dtype}")

    @property
    def key(self) -> str:
        return f"reduce_topk k={self.top_k} D={self.hidden}{' residual' if self.residual else ''} {self.dtype}"

    def flops(self, t=T):
        return t * self.hidden * (self.top_k + int(self.residual))

    def bytes(self, t=T, ops=Sym):
        return t * self.hidden * (self.top_k * self.y_size + self.out_size + 4 * int(self.residual)) + 4 * t * self.top_k

    def programs(self, tile: RowTile, t=T, ops=Sym):
        return ops.ceil_div(t, tile.block_t) * cdiv(self.hidden, tile.block_d)

    def waves(self, tile: RowTile, arch: Arch, t=T, ops=Sym):
        return ops.ceil_div(self.programs(tile, t, ops), self.slots(tile, arch))

    def slots(self, tile: RowTile, arch: Arch) -> int:
        return arch.sms * occupancy(0, tile.num_warps, tile.block_t * tile.block_d / (32 * tile.num_warps), arch)

    def fits(self, tile: RowTile, arch: Arch) -> bool:
        return tile.block_t * tile.block_d <= 32 * 32 * tile.num_warps   # <= 32 fp32 accumulators a thread

    def time(self, tile: RowTile, arch: Arch, t: int) -> float:
        return waves_time(self.programs(tile, t, Num), self.slots(tile, arch), arch,
                           flops_per_program=0.0, dram_total=self.bytes(t, Num), l2_per_program=0.0,
                           in_flight=self.top_k * tile.block_t * tile.block_d * self.y_size, flops_rate=1.0)
@dataclass(frozen=True)
class NormProblem(RowProblem):
    """An ``expert_norm`` node: the ``top_k`` pair rows of each token read twice over the hidden dim, normalised,
    scaled and stored; one program a tile of rows (occupancy, fit and waves as `RowProblem`'s)."""

    @classmethod
    def of(cls, n: Node, g: Graph) -> "NormProblem":
        y_t = g.types[n.ins["y"]]
        pairs = int(sympy.simplify(y_t.shape[0] / T)) if y_t.shape[0] != T else 1
        return cls(top_k=max(pairs, 1), hidden=int(y_t.shape[1]), y_size=itemsize(y_t.dtype),
                   out_size=itemsize(n.types[0].dtype), residual=False, dtype=f"{y_t.dtype}->{n.types[0].dtype}")

    @property
    def key(self) -> str:
        return f"expert_norm D={self.hidden} x{self.top_k} {self.dtype}"

    def flops(self, t=T):
        return 4 * t * self.top_k * self.hidden

    def bytes(self, t=T, ops=Sym):
        return t * self.top_k * self.hidden * (2 * self.y_size + self.out_size + 4)

    def programs(self, tile: RowTile, t=T, ops=Sym):
        return ops.ceil_div(t * self.top_k, tile.block_t)

    def time(self, tile: RowTile, arch: Arch, t: int) -> float:
        return waves_time(self.programs(tile, t, Num), self.slots(tile, arch), arch,
                          flops_per_program=0.0, dram_total=self.bytes(t, Num), l2_per_program=0.0,
                          in_flight=tile.block_t * tile.block_d * self.y_size, flops_rate=1.0)


