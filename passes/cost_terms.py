"""The cost model's shared terms: its constants, occupancy, and the predicted time of a kernel's
programs run in waves. `passes/kernel_costs.py` builds each kernel's problem on them.

Predicted time of a tile at a given T (`time`): the ``programs`` run in waves of ``slots``
programs (the last wave partial); a wave of ``c`` programs on ``min(c, SMs)`` SMs takes the
largest of

- tensor cores:  ``c / min(c, SMs) * (flops_per_program / (peak_per_SM * efficiency)
  + k_steps * ITER_S)`` with the padded FLOPs of a full ``BLOCK_M x BLOCK_N x
  ceil(K / BLOCK_K) BLOCK_K`` tile, the peak of the dtype's unit (tensor cores for fp16/bf16,
  CUDA cores for the exact fp32 path), the efficiency of the MMA family the tile gets
  (`mma_efficiency`) and a fixed issue cost per k-step;
- device memory: ``c * bytes_per_program / min(bandwidth, c * bytes_in_flight / latency)``,
  ``bytes_per_program`` the problem's traffic over its programs (a grouped GEMM's `traffic`, with
  the re-reads its program order causes; the fewest bytes, `bytes`, for the other kernels)
  (Little's law: a program keeps ``max(stages - 1, 1)`` pipeline stages of loads in flight, so
  too few programs or too shallow a pipeline cannot use the bandwidth: why decode wants many
  narrow-N programs with deep K);
- L2 -> SM operand traffic: ``c * (BLOCK_M + mats * BLOCK_N) * K_padded * itemsize / L2
  bandwidth`` (``mats`` = 2 with a GLU; scaled by the share of SMs busy): what makes small tiles
  lose at large T;

plus a fixed per-wave latency (the prologue's dependent loads: offsets, order, first operands), and
``PROGRAM_S`` for each of ``surplus`` programs launched past the tiles (the routed grid's data-independent
upper bound: many experts, tall tiles) that start and exit at once. A persistent grid (``persistent=True``:
at most one program per slot, looping over the tiles) launches no surplus and starts its programs once,
but pays the same dependent prologue loads per tile (Triton's pipeliner does not prefetch across the tile
loop): it wins by the surplus programs it does not start.
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

import sympy

from moec.ir.types import DTYPES, T
from moec.runtime.arch import Arch

# ---- model constants (estimates; see the module docstring) ------------------------------------
DRAM_LATENCY_S = 1.0e-6      # a load's round trip to device memory under load
L2_OVER_DRAM = 3.0           # L2 -> SM operand bandwidth, as a multiple of device-memory bandwidth
L2_SHARE = 0.5               # share of the L2 one operand's reuse can count on (the rest: the other operand, outputs)
WAVE_LATENCIES = 3           # per wave: offsets -> order -> first operands (dependent round trips)
ITER_S = 40e-9               # issue overhead of one k-step of one program (addresses, masks, barrier)
PROGRAM_S = 0.3e-6           # a program's start and exit on an SM (one that finds no tile: a surplus program)
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
        return SLOW_MMA.get(arch.name, 1.0)
    if arch.mma == "tcgen05" and block_m < 128:
        return TCGEN05_HALF
    return 1.0


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
    ``persistent``: by at most ``slots`` programs looping over them; ``surplus``: programs launched past
    them that exit at once (not with ``persistent``)."""
    if programs <= 0:
        return 0.0 if persistent else surplus / arch.sms * PROGRAM_S
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
    if persistent:      # the same work and per-tile prologue latency; no surplus programs
        return full * wave(slots) + wave(tail)
    return full * wave(slots) + wave(tail) + surplus / sms * PROGRAM_S


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def per_token(expr) -> int:
    """``c`` for a row count ``c * T`` (the only row counts the IR makes)."""
    expr = sympy.sympify(expr)
    c = expr.subs(T, 1)
    if sympy.simplify(expr - c * T) != 0:
        raise ValueError(f"row count {expr} is not a multiple of T")
    return int(c)
