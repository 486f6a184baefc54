"""Facts about each GPU target moec generates code for, and which target this process runs on.

One `Arch` per compute capability moec targets, describing the common data-centre part of that
generation (named in each row's comment). Limits (SMs, shared memory, registers, threads) are the
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
    "cpu": Arch("cpu", 0, 1, 1 << 30, 1 << 30, "interpreter", False, smem_per_sm=1 << 30,
                l2_bytes=1 << 30, part="Triton interpreter"),
}
GPU_ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm100")


def arch_of(device: torch.device | str | None = None) -> Arch:
    """The `Arch` for a device: the CUDA capability rounded to a known target, or cpu."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return ARCHS["cpu"]
    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    known = [a for a in ARCHS.values() if 0 < a.cc <= cc]
    if not known:
        raise RuntimeError(f"moec needs compute capability >= 8.0, this GPU has {major}.{minor}")
    return max(known, key=lambda a: a.cc)


def resolve(arch: str | Arch | None, device: torch.device | str | None = None) -> Arch:
    """An explicit arch name wins; otherwise the device decides."""
    if isinstance(arch, Arch):
        return arch
    if arch is None:
        return arch_of(device)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch]
