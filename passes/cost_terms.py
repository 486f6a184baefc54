"""The cost model's shared terms: its constants, occupancy, and the predicted time of a kernel's
programs run in waves. `passes/kernel_costs.py` builds each kernel's problem on them.

Predicted time of a tile at a given T (`waves_time`): the ``programs`` run ``slots`` at a time; the
kernel takes the largest of

- tensor cores, in waves of ``slots`` programs (the last wave partial, leaving SMs idle): a wave of ``c``
  programs takes ``c / min(c, SMs) * (flops_per_program / (peak_per_SM * efficiency)
  + k_steps * ITER_S)`` with the padded FLOPs of a full ``BLOCK_M x BLOCK_N x
  ceil(K / BLOCK_K) BLOCK_K`` tile, the peak of the dtype's unit (tensor cores for fp16/bf16,
  CUDA cores for the exact fp32 path), the efficiency of the MMA family the tile gets
  (`mma_efficiency`: ``MMA_EFFICIENCY`` of the datasheet peak for a well-fed tile, less for mma.sync on
  sm90/100 and half-height tcgen05 tiles) and a fixed issue cost per k-step;
- device memory, streamed over the whole grid (a slot that frees starts the next program, whose loads
  overlap the others' last ones): ``bytes / min(bandwidth, c * bytes_in_flight / latency, busy SMs *
  SM_BW_SHARE * bandwidth / SMs)`` with ``c = min(programs, slots)`` programs resident, ``bytes`` the
  problem's traffic (a grouped GEMM's `traffic`, with the re-reads its program order causes; the fewest
  bytes, `bytes`, for the other kernels)
  (Little's law: a program keeps ``max(stages - 1, 1)`` pipeline stages of loads in flight, so
  too few programs or too shallow a pipeline cannot use the bandwidth: why decode wants many
  narrow-N programs with deep K; and one SM cannot pull more than ``SM_BW_SHARE`` times its even share
  of the bandwidth, so a grid on half the SMs cannot stream the weights at full speed either);
- L2 -> SM operand traffic, over the whole grid too: ``programs * (BLOCK_M + mats * BLOCK_N) * K_padded *
  itemsize / L2 bandwidth`` (``mats`` = 2 with a GLU; scaled by the share of SMs busy): what makes small
  tiles lose at large T;

plus a fixed per-wave latency (the prologue's dependent loads: offsets, order, first operands),
``PROGRAM_S`` for every program the grid starts, spread over the SMs (each SM starts its programs one
after another: what makes tens of thousands of tiny programs lose at decode), including the ``surplus``
programs launched past the tiles (the routed grid's data-independent upper bound: many experts, tall
tiles) that exit at once, and ``LAUNCH_S`` for the launch. A persistent grid (``persistent=True``: at most
one program per slot, looping over the tiles) starts only its programs, but pays the same dependent
prologue loads per tile (Triton's pipeliner does not prefetch across the tile loop): it wins by the
programs it does not start.
A grouped GEMM's loads count the rows its tiles hold on average (``min(BLOCK_M, M / row_tiles)``),
not ``BLOCK_M``: the rows past an expert's last pair are masked and never fetched, so a tile of
padding rows buys no memory parallelism (at decode, a 64-row tile holding 2 pairs keeps no more
bytes in flight than a 16-row one, and only costs more MMA work).

Shared memory is that of the pipeline buffers Triton allocates: ``stages`` on wgmma/tcgen05
tiles, ``stages - 1`` on mma.sync ones (checked against AOT compiles in
tests/test_cost_model.py); a tile fits when that and its fp32 accumulators fit the arch.

The constants below are uncalibrated estimates (no GPU measured them for this model); the
arch facts are nominal datasheet numbers. `moec.autotune` times the model's best
candidates on a real GPU and records the winners, which choose-tiles uses before the model.
"""
from __future__ import annotations

import math

import sympy

from moec.ir.types import DTYPES, T
from moec.runtime.arch import Arch

# ---- model constants (estimates; see the module docstring) ------------------------------------
DRAM_LATENCY_S = 1.0e-6      # a load's round trip to device memory under load
L2_OVER_DRAM = 2.0           # L2 -> SM operand bandwidth, as a multiple of device-memory bandwidth
SM_BW_SHARE = 1.5            # device-memory bandwidth one SM can pull, as a multiple of its even share
LAUNCH_S = 2.5e-6            # one kernel launch, on the GPU's side (the host's is benchmarks/host.py's)
MMA_EFFICIENCY = 0.8         # share of the datasheet tensor-core peak a well-fed MMA tile reaches (a bf16
                             # GEMM measured ~790 of the H100's 989 TFLOP/s)
L2_SHARE = 0.5               # share of the L2 one operand's reuse can count on (the rest: the other operand, outputs)
WAVE_LATENCIES = 3           # per wave: offsets -> order -> first operands (dependent round trips)
ITER_S = 40e-9               # issue overhead of one k-step of one program (addresses, masks, barrier)
PROGRAM_S = 0.3e-6           # a program's start and exit on an SM (block scheduling, prologue set-up)
SLOW_MMA = {"sm90": 0.6, "sm100": 0.3}   # mma.sync (BLOCK_M below fast_mma_min_m) vs the fast family
TCGEN05_HALF = 0.5           # sm100 with BLOCK_M = 64: half-height tcgen05 tiles
MAX_ACC_REGS = 128           # fp32 accumulator registers per thread before spills threaten
# mma.sync tiles (every tile on sm80/86/89/120; BLOCK_M below 64 on sm90/100) also hold their operands' K
# step in registers: accumulators plus those operand registers above this, ptxas spills (AOT: a 128x128
# GLU tile on sm80 compiles to 32 registers and ~14 KB of spills, a 16x128x256 one spills on sm90)
MAX_SYNC_REGS = 120


def sync_regs(acc_regs: float, stage_bytes: int, warps: int) -> float:
    """Registers per thread an mma.sync tile holds: its fp32 accumulators and one K step of its operands (a
    pipeline stage's bytes, 4 bytes a register)."""
    return acc_regs + stage_bytes / (4 * 32 * warps)


def sync_mma(block_m: int, arch: Arch) -> bool:
    """Whether a tile of ``block_m`` rows runs on mma.sync (operands through registers) on ``arch``."""
    return arch.mma == "mma.sync" or block_m < arch.fast_mma_min_m
SMEM_RESERVE = 1024          # bytes per CTA kept for barriers and scratch
LINE_BYTES = 128             # a K chunk should cover whole 128-byte lines of its contiguous rows


def pow2(n: int, lo: int = 16) -> int:
    """The least power of two ``>= max(n, lo)``."""
    p = lo
    while p < n:
        p *= 2
    return p


def cdiv(a, b):
    return -(-a // b)


class Num:
    """Integer arithmetic for numeric evaluation (the same formulas as the sympy expressions)."""
    ceil_div = staticmethod(cdiv)
    min = staticmethod(min)
    max = staticmethod(max)


class Sym:
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
        return MMA_EFFICIENCY * SLOW_MMA.get(arch.name, 1.0)
    if arch.mma == "tcgen05" and block_m < 128:
        return MMA_EFFICIENCY * TCGEN05_HALF
    return MMA_EFFICIENCY


def pipeline_buffers(stages: int, block_m: int, arch: Arch) -> int:
    """Operand buffers Triton allocates: ``stages`` for wgmma/tcgen05 tiles, ``stages - 1`` for
    the mma.sync pipeline (cp.async), at least one."""
    if arch.mma in ("wgmma", "tcgen05") and block_m >= arch.fast_mma_min_m:
        return max(stages, 1)
    return max(stages - 1, 1)


def occupancy(smem: int, warps: int, acc_regs: float, arch: Arch) -> int:
    threads = 32 * warps
    regs = min(arch.max_regs_per_thread, int(acc_regs * 1.25) + 40)
    by_smem = arch.smem_per_sm // (smem + SMEM_RESERVE)
    by_regs = arch.regs_per_sm // (regs * threads)
    by_threads = arch.max_threads_per_sm // threads
    return max(1, min(by_smem, by_regs, by_threads))


def waves_time(programs: int, slots: int, arch: Arch, flops_per_program: float, dram_total: float,
                l2_per_program: float, in_flight: float, flops_rate: float, iters: int = 1,
                persistent: bool = False, surplus: int = 0) -> float:
    """Seconds for ``programs`` programs (tiles) run ``slots`` at a time (see the module docstring);
    ``persistent``: by at most ``slots`` programs looping over them; ``surplus``: programs the grid's bound
    launches past them, which exit at once (a persistent grid launches the bound's programs up to ``slots``)."""
    sms = arch.sms
    # the programs started (a persistent grid: at most a slot's worth, looping) and the launch
    starts = min(programs + surplus, slots) if persistent else programs + surplus
    overhead = starts / sms * PROGRAM_S + LAUNCH_S
    if programs <= 0:
        return overhead
    dram_bw = arch.dram_gbps * 1e9
    l2_bw = dram_bw * L2_OVER_DRAM
    rate_sm = flops_rate / sms

    def compute(c: int) -> float:
        return c * (flops_per_program / rate_sm + iters * ITER_S) / min(c, sms) if c > 0 else 0.0

    full, tail = divmod(programs, slots)
    waves = full + (tail > 0)
    # the tensor cores work in waves (a partial last wave leaves SMs idle); device memory and L2 stream over
    # the whole grid (a slot that frees starts the next program, whose loads overlap the last ones of the rest)
    busy_programs = min(programs, slots)
    busy = min(busy_programs, sms)
    dram = dram_total / min(dram_bw, busy_programs * in_flight / DRAM_LATENCY_S, busy * SM_BW_SHARE * dram_bw / sms)
    l2 = programs * l2_per_program / (l2_bw * busy / sms)
    # a persistent grid pays the same dependent prologue loads per tile as one program per tile pays per wave
    return max(full * compute(slots) + compute(tail), dram, l2) + waves * WAVE_LATENCIES * DRAM_LATENCY_S + overhead


def expected_tiles(rows: float, experts: int, block_m: int) -> float:
    """Expected row tiles ``sum_e E[ceil(n_e / BLOCK_M)]`` when ``rows`` pairs pick among ``experts``
    uniformly (``n_e`` ~ Poisson(rows / experts)): each expert's last tile is padded, which the mean load
    alone misses (DeepSeek-V3 at T = 4096: 128 pairs an expert on average, 1.5 tiles of 128 expected, not 1).
    ``E[ceil(n / B)] = sum_j P(n > j B)``: Poisson sums up to a mean of 64, a normal law beyond."""
    if rows <= 0:
        return 0.0
    lam = rows / experts
    total, j = 0.0, 0
    if lam <= 64:
        pmf, cdf, n = math.exp(-lam), 0.0, 0
        while True:
            while n <= j * block_m:
                cdf += pmf
                n += 1
                pmf *= lam / n
            tail = 1.0 - cdf
            if tail < 1e-9:
                break
            total += tail
            j += 1
    else:
        sd = math.sqrt(lam)
        while True:
            tail = 0.5 * math.erfc((j * block_m + 0.5 - lam) / (sd * math.sqrt(2)))
            if tail < 1e-9 and j * block_m > lam:
                break
            total += tail
            j += 1
    return experts * total


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def per_token(expr) -> int:
    """``c`` for a row count ``c * T`` (the only row counts the IR makes)."""
    expr = sympy.sympify(expr)
    c = expr.subs(T, 1)
    if sympy.simplify(expr - c * T) != 0:
        raise ValueError(f"row count {expr} is not a multiple of T")
    return int(c)
