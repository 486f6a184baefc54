"""Facts about each GPU target moec generates code for, and which target this process runs on.

One `Arch` per target moec generates code for, describing a common part of that generation
(its ``part``); on a real GPU, `arch_of` replaces the limits with the ones the device reports. Limits (SMs, shared memory, registers, threads) are the
hardware's; `smem_per_block` is the opt-in maximum dynamic shared memory one CTA may use, which is
what a kernel's tiles must fit, `smem_per_sm` what all resident CTAs of an SM share.

`bf16_tflops` (dense tensor-core rate, fp16 the same), `fp32_tflops` (CUDA cores, which the exact
fp32 GEMM path uses), `dram_gbps` and `l2_bytes` are nominal datasheet numbers of that part. The cost model
(`passes/cost_model.py`) uses them only to rank tiles against each other, never as a promise;
`benchmarks/moe.py` measures the real ceilings of the GPU it runs on.

`mma` is the tensor-core instruction family Triton emits for a fp16/bf16 `tl.dot` on that arch
when the tile allows it, and `fast_mma_min_m` the smallest BLOCK_M that gets it (smaller tiles fall
back to `mma.sync`, the Ampere instructions, on Hopper and Blackwell too).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    name: str            # "sm90", or "cpu" for the Triton interpreter
    cc: int              # compute capability as an int (90); 0 for cpu
    sms: int             # streaming multiprocessors (the part named in ARCHS)
    smem_per_block: int  # bytes of shared memory one CTA may use (opt-in maximum)
    regs_per_sm: int     # 32-bit registers per SM
    mma: str             # tensor-core instruction family Triton emits for fp16/bf16 dots
    fp8: bool            # fp8 (e4m3/e5m2) tensor-core instructions
    smem_per_sm: int = 0          # bytes of shared memory per SM (all resident CTAs together)
    max_threads_per_sm: int = 2048
    max_regs_per_thread: int = 255
    fast_mma_min_m: int = 16      # smallest BLOCK_M Triton gives the `mma` family above
    bf16_tflops: float = 0.0      # nominal dense fp16/bf16 tensor-core rate
    fp32_tflops: float = 0.0      # nominal fp32 rate of the CUDA cores (FMA)
    dram_gbps: float = 0.0        # nominal device-memory bandwidth, GB/s
    l2_bytes: int = 0             # L2 cache, bytes (what operand reuse across programs can rely on)
    part: str = ""                # the product these numbers describe


KB = 1024
MB = 1024 * KB

ARCHS = {
    "sm80": Arch("sm80", 80, 108, 163 * KB, 65536, "mma.sync", False, smem_per_sm=164 * KB,
                 max_threads_per_sm=2048, fast_mma_min_m=16, bf16_tflops=312.0, fp32_tflops=19.5,
                 dram_gbps=2039.0, l2_bytes=40 * MB, part="A100 SXM4 80GB"),
    "sm86": Arch("sm86", 86, 84, 99 * KB, 65536, "mma.sync", False, smem_per_sm=100 * KB,
                 max_threads_per_sm=1536, fast_mma_min_m=16, bf16_tflops=149.7, fp32_tflops=37.4,
                 dram_gbps=696.0, l2_bytes=6 * MB, part="A40"),
    "sm89": Arch("sm89", 89, 142, 99 * KB, 65536, "mma.sync", True, smem_per_sm=100 * KB,
                 max_threads_per_sm=1536, fast_mma_min_m=16, bf16_tflops=362.0, fp32_tflops=91.6,
                 dram_gbps=864.0, l2_bytes=96 * MB, part="L40S"),
    "sm90": Arch("sm90", 90, 132, 227 * KB, 65536, "wgmma", True, smem_per_sm=228 * KB,
                 max_threads_per_sm=2048, fast_mma_min_m=64, bf16_tflops=989.0, fp32_tflops=67.0,
                 dram_gbps=3350.0, l2_bytes=50 * MB, part="H100 SXM5 80GB"),
    "sm100": Arch("sm100", 100, 148, 227 * KB, 65536, "tcgen05", True, smem_per_sm=228 * KB,
                  max_threads_per_sm=2048, fast_mma_min_m=64, bf16_tflops=2250.0, fp32_tflops=80.0,
                  dram_gbps=8000.0, l2_bytes=126 * MB, part="B200"),
    "sm120": Arch("sm120", 120, 170, 99 * KB, 65536, "mma.sync", True, smem_per_sm=100 * KB,
                  max_threads_per_sm=1536, fast_mma_min_m=16, bf16_tflops=209.5, fp32_tflops=104.8,
                  dram_gbps=1792.0, l2_bytes=96 * MB, part="GeForce RTX 5090"),
    "cpu": Arch("cpu", 0, 1, 1 << 30, 1 << 30, "interpreter", False, smem_per_sm=1 << 30,
                l2_bytes=1 << 30, part="Triton interpreter"),
}
GPU_ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120")

# the target of each compute capability moec knows: (major, minor) -> arch, or major -> arch for
# every minor of that major (sm100 covers B200 and B300, and Thor, 11.0, has the same tensor cores)
FAMILY = {(8, 0): "sm80", (8, 6): "sm86", (8, 7): "sm86", (8, 9): "sm89", 9: "sm90", 10: "sm100",
          11: "sm100", 12: "sm120"}


def arch_of(device: torch.device | str | None = None) -> Arch:
    """The `Arch` for a device: the target of its compute capability (`FAMILY`) with the SM count,
    shared memory per block and L2 size the device reports (an H100 PCIe has 114 SMs, not the SXM
    part's 132), or cpu. A capability moec has no target for is an error naming it: a guessed
    target could promise shared memory or tensor cores the GPU lacks."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return ARCHS["cpu"]
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> Arch:
    """`arch_of` for CUDA device ``index``: asked once per process (it runs on every compiled
    call's path, where building it anew would cost at decode)."""
    device = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(device)
    name = FAMILY.get((major, minor)) or FAMILY.get(major)
    if name is None:
        raise RuntimeError(f"moec has no target for compute capability {major}.{minor} "
                           f"(known: sm80, sm86, sm87, sm89, sm9x, sm10x, sm11x, sm12x); pass arch= one of "
                           f"{list(GPU_ARCHS)} to compile for the closest one explicitly")
    return with_device_facts(ARCHS[name], torch.cuda.get_device_properties(device))


def with_device_facts(arch: Arch, props) -> Arch:
    """``arch`` with the limits a device reports (``torch.cuda.get_device_properties``) where it
    reports them; the rates stay nominal."""
    got = {"sms": getattr(props, "multi_processor_count", 0),
           "smem_per_block": getattr(props, "shared_memory_per_block_optin", 0),
           "smem_per_sm": getattr(props, "shared_memory_per_multiprocessor", 0),
           "regs_per_sm": getattr(props, "regs_per_multiprocessor", 0),
           "max_threads_per_sm": getattr(props, "max_threads_per_multi_processor", 0),
           "l2_bytes": getattr(props, "L2_cache_size", 0)}
    facts = {k: int(v) for k, v in got.items() if isinstance(v, int) and v > 0}
    name = getattr(props, "name", "")
    return dataclasses.replace(arch, **facts, part=name if isinstance(name, str) and name else arch.part)


def facts(name: str) -> Arch:
    """The named target's facts: this process's GPU's (`arch_of`) when it is that target, else
    the nominal `ARCHS` entry (compiling for a GPU that is not here)."""
    if name != "cpu" and torch.cuda.is_available():
        here = arch_of("cuda")
        if here.name == name:
            return here
    return ARCHS[name]


def resolve(arch: str | Arch | None, device: torch.device | str | None = None) -> Arch:
    """An explicit arch name wins; otherwise the device decides."""
    if isinstance(arch, Arch):
        return arch
    if arch is None:
        return arch_of(device)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch]
