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
Skewed routing (a few hot experts) has fewer, fuller tiles than assumed.

Predicted time of a tile at a given T (`time`): the ``programs`` run in waves of ``slots``
programs (the last wave partial); a wave of ``c`` programs on ``min(c, SMs)`` SMs takes the
largest of

- tensor cores:  ``c / min(c, SMs) * (flops_per_program / (peak_per_SM * efficiency)
  + k_steps * ITER_S)`` with the padded FLOPs of a full ``BLOCK_M x BLOCK_N x
  ceil(K / BLOCK_K) BLOCK_K`` tile, the peak of the dtype's unit (tensor cores for fp16/bf16,
  CUDA cores for the exact fp32 path), the efficiency of the MMA family the tile gets
  (`mma_efficiency`) and a fixed issue cost per k-step;
- device memory: ``c * bytes_per_program / min(bandwidth, c * bytes_in_flight / latency)``
  (Little's law: a program keeps ``max(stages - 1, 1)`` pipeline stages of loads in flight, so
  too few programs or too shallow a pipeline cannot use the bandwidth: why decode wants many
  narrow-N programs with deep K);
- L2 -> SM operand traffic: ``c * (BLOCK_M + mats * BLOCK_N) * K_padded * itemsize / L2
  bandwidth`` (``mats`` = 2 with a GLU; scaled by the share of SMs busy): what makes small tiles
  lose at large T;

plus a fixed per-wave latency (the prologue's dependent loads: offsets, order, first operands).
A grouped GEMM's loads count the rows its tiles hold on average (``min(BLOCK_M, M / row_tiles)``),
not ``BLOCK_M``: the rows past an expert's last pair are masked and never fetched, so a tile of
padding rows buys no memory parallelism (at decode, a 64-row tile holding 2 pairs keeps no more
bytes in flight than a 16-row one, and only costs more MMA work).

Shared memory is that of the pipeline buffers Triton allocates: ``stages`` on wgmma/tcgen05
tiles, ``stages - 1`` on mma.sync ones (checked against AOT compiles in
tests/test_cost_model.py); a tile fits when that and its fp32 accumulators fit the arch.

The constants below are uncalibrated estimates (no GPU measured them for this model); the
arch facts are nominal datasheet numbers. `moec.runtime.autotune` times the model's best
candidates on a real GPU and records the winners, which choose-tiles uses before the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from moec.ir.graph import Graph, Node
from moec.ir.types import DTYPES, T
from moec.runtime.arch import Arch
from moec.runtime.tiles import GemmTile, RouteTile, RowTile

# ---- model constants (estimates; see the module docstring) ------------------------------------
DRAM_LATENCY_S = 1.0e-6      # a load's round trip to device memory under load
L2_OVER_DRAM = 3.0           # L2 -> SM operand bandwidth, as a multiple of device-memory bandwidth
WAVE_LATENCIES = 3           # per wave: offsets -> order -> first operands (dependent round trips)
ITER_S = 40e-9               # issue overhead of one k-step of one program (addresses, masks, barrier)
SLOW_MMA = {"sm90": 0.6, "sm100": 0.3}   # mma.sync (BLOCK_M below fast_mma_min_m) vs the fast family
TCGEN05_HALF = 0.5           # sm100 with BLOCK_M = 64: half-height tcgen05 tiles
MAX_ACC_REGS = 128           # fp32 accumulator registers per thread before spills threaten
SMEM_RESERVE = 1024          # bytes per CTA kept for barriers and scratch
LINE_BYTES = 128             # a K chunk should cover whole 128-byte lines of its contiguous rows


def pow2(n: int, lo: int = 16) -> int:
    """The least power of two ``>= max(n, lo)``."""
    p = lo
    while p < n:
        p *= 2
    return p


def _cdiv(a, b):
    return -(-a // b)


class _Num:
    """Integer arithmetic for numeric evaluation (the same formulas as the sympy expressions)."""
    ceil_div = staticmethod(_cdiv)
    min = staticmethod(min)
    max = staticmethod(max)


class _Sym:
    """sympy arithmetic: the formulas become expressions of the symbol T."""
    @staticmethod
    def ceil_div(a, b):
        return sympy.ceiling(sympy.sympify(a) / b)
    min = staticmethod(sympy.Min)
    max = staticmethod(sympy.Max)


def mma_efficiency(block_m: int, arch: Arch, fp32: bool) -> float:
    """Share of the arch's peak a tile with ``block_m`` rows can reach on its MMA instructions."""
    if fp32:
        return 1.0                      # exact fp32 dots: CUDA-core FMAs, rate fp32_tflops
    if block_m < arch.fast_mma_min_m:
        return SLOW_MMA.get(arch.name, 1.0)
    if arch.mma == "tcgen05" and block_m < 128:
        return TCGEN05_HALF
    return 1.0


def _pipeline_buffers(stages: int, block_m: int, arch: Arch) -> int:
    """Operand buffers Triton allocates: ``stages`` for wgmma/tcgen05 tiles, ``stages - 1`` for
    the mma.sync pipeline (cp.async), at least one."""
    if arch.mma in ("wgmma", "tcgen05") and block_m >= arch.fast_mma_min_m:
        return max(stages, 1)
    return max(stages - 1, 1)


def _occupancy(smem: int, warps: int, acc_regs: float, arch: Arch) -> int:
    threads = 32 * warps
    regs = min(arch.max_regs_per_thread, int(acc_regs * 1.25) + 40)
    by_smem = arch.smem_per_sm // (smem + SMEM_RESERVE)
    by_regs = arch.regs_per_sm // (regs * threads)
    by_threads = arch.max_threads_per_sm // threads
    return max(1, min(by_smem, by_regs, by_threads))


def _waves_time(programs: int, slots: int, arch: Arch, flops_per_program: float, dram_total: float,
                l2_per_program: float, in_flight: float, flops_rate: float, iters: int = 1) -> float:
    """Seconds for ``programs`` programs run ``slots`` at a time (see the module docstring)."""
    if programs <= 0:
        return 0.0
    sms = arch.sms
    dram_bw = arch.dram_gbps * 1e9
    l2_bw = dram_bw * L2_OVER_DRAM
    rate_sm = flops_rate / sms
    per_program_dram = dram_total / programs

    def wave(c: int) -> float:
        if c <= 0:
            return 0.0
        busy = min(c, sms)
        compute = c * (flops_per_program / rate_sm + iters * ITER_S) / busy
        dram = c * per_program_dram / min(dram_bw, c * in_flight / DRAM_LATENCY_S)
        l2 = c * l2_per_program / (l2_bw * busy / sms)
        return max(compute, dram, l2) + WAVE_LATENCIES * DRAM_LATENCY_S

    full, tail = divmod(programs, slots)
    return full * wave(slots) + wave(tail)


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def _per_token(expr) -> int:
    """``c`` for a row count ``c * T`` (the only row counts the IR makes)."""
    expr = sympy.sympify(expr)
    c = expr.subs(T, 1)
    if sympy.simplify(expr - c * T) != 0:
        raise ValueError(f"row count {expr} is not a multiple of T")
    return int(c)


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

    @classmethod
    def of(cls, n: Node, g: Graph) -> "GemmProblem":
        a_t, out_t = g.types[n.ins["a"]], n.types[0]
        a = n.attr
        return cls(experts=a["num_experts"], routed="offsets" in n.ins,
                   rows_per_token=_per_token(out_t.shape[0]), a_rows_per_token=_per_token(a_t.shape[0]),
                   n=int(out_t.shape[1]), k=int(a_t.shape[1]), glu=bool(a["glu"]),
                   in_size=_itemsize(a_t.dtype), out_size=_itemsize(out_t.dtype), fp32=a_t.dtype == "f32",
                   indexed=bool(a["gather_top_k"] or a["scatter"]), scale="scale" in n.ins,
                   dtype=a_t.dtype, out_dtype=out_t.dtype, gather_top_k=a["gather_top_k"],
                   scatter=bool(a["scatter"]))

    @property
    def key(self) -> str:
        """Names the kernel shape (the autotune file's key)."""
        bits = [f"grouped_gemm E={self.experts} N={self.n} K={self.k}"]
        if self.glu:
            bits.append("glu")
        if self.gather_top_k:
            bits.append(f"gather={self.gather_top_k}")
        if self.scatter:
            bits.append("scatter")
        bits.append(f"{self.dtype}->{self.out_dtype}")
        return " ".join(bits)

    @property
    def mats(self) -> int:
        return 2 if self.glu else 1

    # -- sympy expressions of T (also evaluated numerically with ops=_Num and an int t)
    def rows(self, t=T):
        return self.rows_per_token * t

    def hit_experts(self, t=T, ops=_Sym):
        return ops.min(self.experts if self.routed else 1, self.rows(t))

    def flops(self, t=T):
        return 2 * self.rows(t) * self.n * self.k * self.mats

    def bytes(self, t=T, ops=_Sym):
        M = self.rows(t)
        b = self.a_rows_per_token * t * self.k * self.in_size              # activations, read once
        b += self.hit_experts(t, ops) * self.mats * self.n * self.k * self.in_size   # hit experts' weights
        b += M * self.n * self.out_size                                     # output
        b += 4 * M * (int(self.indexed) + int(self.scale))                  # order, scale vectors
        return b

    def row_tiles(self, tile: GemmTile, t=T, ops=_Sym):
        M = self.rows(t)
        if not self.routed:
            return ops.ceil_div(M, tile.block_m)
        hit = self.hit_experts(t, ops)
        return hit * ops.ceil_div(M, ops.max(hit, 1) * tile.block_m)

    def programs(self, tile: GemmTile, t=T, ops=_Sym):
        return self.row_tiles(tile, t, ops) * _cdiv(self.n, tile.block_n)

    def waves(self, tile: GemmTile, arch: Arch, t=T, ops=_Sym):
        return ops.ceil_div(self.programs(tile, t, ops), self.slots(tile, arch))

    # -- per-tile facts
    def stage_bytes(self, tile: GemmTile) -> int:
        return (tile.block_m + self.mats * tile.block_n) * tile.block_k * self.in_size

    def smem(self, tile: GemmTile, arch: Arch) -> int:
        return _pipeline_buffers(tile.num_stages, tile.block_m, arch) * self.stage_bytes(tile)

    def acc_regs(self, tile: GemmTile) -> float:
        return self.mats * tile.block_m * tile.block_n / (32 * tile.num_warps)

    def slots(self, tile: GemmTile, arch: Arch) -> int:
        return arch.sms * _occupancy(self.smem(tile, arch), tile.num_warps, self.acc_regs(tile), arch)

    def fits(self, tile: GemmTile, arch: Arch) -> bool:
        return (self.smem(tile, arch) + SMEM_RESERVE <= arch.smem_per_block
                and self.acc_regs(tile) <= MAX_ACC_REGS)

    def loaded_rows(self, tile: GemmTile, t: int) -> float:
        """Rows a tile loads on average at ``T = t``: ``min(BLOCK_M, M / row_tiles)`` (rows past
        an expert's last pair are masked, never fetched)."""
        tiles = self.row_tiles(tile, t, _Num)
        return min(tile.block_m, self.rows(t) / tiles) if tiles else tile.block_m

    def time(self, tile: GemmTile, arch: Arch, t: int) -> float:
        """Predicted seconds at ``T = t`` (see the module docstring)."""
        programs = self.programs(tile, t, _Num)
        k_pad = _cdiv(self.k, tile.block_k) * tile.block_k
        peak = (arch.fp32_tflops if self.fp32 else arch.bf16_tflops) * 1e12
        rate = peak * mma_efficiency(tile.block_m, arch, self.fp32)
        loaded = (self.loaded_rows(tile, t) + self.mats * tile.block_n) * self.in_size   # bytes per unit of K
        in_flight = max(tile.num_stages - 1, 1) * loaded * tile.block_k
        return _waves_time(programs, self.slots(tile, arch), arch,
                           flops_per_program=2 * tile.block_m * tile.block_n * k_pad * self.mats,
                           dram_total=self.bytes(t, _Num), l2_per_program=loaded * k_pad,
                           in_flight=in_flight, flops_rate=rate, iters=k_pad // tile.block_k)


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
        x_t = g.types[n.ins["x"]]
        return cls(experts=n.attr["num_experts"], top_k=n.attr["top_k"], hidden=int(x_t.shape[1]),
                   in_size=_itemsize(x_t.dtype), fp32=x_t.dtype == "f32",
                   mats=2 if "w_noise" in n.ins else 1, dtype=x_t.dtype)

    @property
    def key(self) -> str:
        return f"fused_route E={self.experts} k={self.top_k} d={self.hidden}{' noisy' if self.mats == 2 else ''} {self.dtype}"

    @property
    def e_pad(self) -> int:
        return pow2(self.experts)

    def flops(self, t=T):
        return 2 * t * self.hidden * self.e_pad * self.mats

    def bytes(self, t=T, ops=_Sym):
        return (t * self.hidden * self.in_size + self.mats * self.experts * self.hidden * self.in_size
                + t * self.top_k * 8 + 4 * self.experts)

    def programs(self, tile: RouteTile, t=T, ops=_Sym):
        return ops.ceil_div(t, tile.block_t)

    def waves(self, tile: RouteTile, arch: Arch, t=T, ops=_Sym):
        return ops.ceil_div(self.programs(tile, t, ops), self.slots(tile, arch))

    def block_k(self, tile: RouteTile) -> int:
        return min(tile.block_k, pow2(self.hidden))

    def stage_bytes(self, tile: RouteTile) -> int:
        return (tile.block_t + self.mats * self.e_pad) * self.block_k(tile) * self.in_size

    def smem(self, tile: RouteTile, arch: Arch) -> int:
        return _pipeline_buffers(tile.num_stages, tile.block_t, arch) * self.stage_bytes(tile)

    def acc_regs(self, tile: RouteTile) -> float:
        # logits, selection keys and scores of the [BLOCK_T, E_PAD] tile live in registers at once
        return 3 * self.mats * tile.block_t * self.e_pad / (32 * tile.num_warps)

    def slots(self, tile: RouteTile, arch: Arch) -> int:
        return arch.sms * _occupancy(self.smem(tile, arch), tile.num_warps, self.acc_regs(tile), arch)

    def fits(self, tile: RouteTile, arch: Arch) -> bool:
        return (self.smem(tile, arch) + SMEM_RESERVE <= arch.smem_per_block
                and self.acc_regs(tile) <= MAX_ACC_REGS)

    def time(self, tile: RouteTile, arch: Arch, t: int) -> float:
        bk = self.block_k(tile)
        k_pad = _cdiv(self.hidden, bk) * bk
        peak = (arch.fp32_tflops if self.fp32 else arch.bf16_tflops) * 1e12
        return _waves_time(self.programs(tile, t, _Num), self.slots(tile, arch), arch,
                           flops_per_program=2 * tile.block_t * self.e_pad * k_pad * self.mats,
                           dram_total=self.bytes(t, _Num),
                           l2_per_program=(tile.block_t + self.mats * self.e_pad) * k_pad * self.in_size,
                           in_flight=max(tile.num_stages - 1, 1) * self.stage_bytes(tile),
                           flops_rate=peak * mma_efficiency(tile.block_t, arch, self.fp32),
                           iters=k_pad // bk)


# ---- the top-k reduce -----------------------------------------------------------------------

@dataclass(frozen=True)
class RowProblem:
    """A ``reduce_topk`` node: ``T`` rows of ``k`` fp32 pair rows summed (+ a residual)."""

    top_k: int
    hidden: int
    y_size: int
    out_size: int
    residual: bool
    dtype: str = ""

    @classmethod
    def of(cls, n: Node, g: Graph) -> "RowProblem":
        y_t = g.types[n.ins["y"]]
        return cls(top_k=n.attr["top_k"], hidden=int(n.types[0].shape[1]), y_size=_itemsize(y_t.dtype),
                   out_size=_itemsize(n.types[0].dtype), residual="residual" in n.ins,
                   dtype=f"{y_t.dtype}->{n.types[0].dtype}")

    @property
    def key(self) -> str:
        return f"reduce_topk k={self.top_k} D={self.hidden}{' residual' if self.residual else ''} {self.dtype}"

    def flops(self, t=T):
        return t * self.hidden * (self.top_k + int(self.residual))

    def bytes(self, t=T, ops=_Sym):
        return t * self.hidden * (self.top_k * self.y_size + self.out_size + 4 * int(self.residual)) + 4 * t * self.top_k

    def programs(self, tile: RowTile, t=T, ops=_Sym):
        return ops.ceil_div(t, tile.block_t) * _cdiv(self.hidden, tile.block_d)

    def waves(self, tile: RowTile, arch: Arch, t=T, ops=_Sym):
        return ops.ceil_div(self.programs(tile, t, ops), self.slots(tile, arch))

    def slots(self, tile: RowTile, arch: Arch) -> int:
        return arch.sms * _occupancy(0, tile.num_warps, tile.block_t * tile.block_d / (32 * tile.num_warps), arch)

    def fits(self, tile: RowTile, arch: Arch) -> bool:
        return tile.block_t * tile.block_d <= 32 * 32 * tile.num_warps   # <= 32 fp32 accumulators a thread

    def time(self, tile: RowTile, arch: Arch, t: int) -> float:
        return _waves_time(self.programs(tile, t, _Num), self.slots(tile, arch), arch,
                           flops_per_program=0.0, dram_total=self.bytes(t, _Num), l2_per_program=0.0,
                           in_flight=self.top_k * tile.block_t * tile.block_d * self.y_size, flops_rate=1.0)


PROBLEMS = {"grouped_gemm": GemmProblem, "fused_route": RouteProblem, "reduce_topk": RowProblem}


def problem_of(n: Node, g: Graph):
    """The cost-model problem of a kernel node."""
    return PROBLEMS[n.op].of(n, g)
