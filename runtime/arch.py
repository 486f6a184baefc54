"""Facts about each GPU target moec generates code for, and which target this process runs on.

Numbers are per-SM limits from the vendors' tuning guides; `smem_per_block` is the opt-in
maximum dynamic shared memory one CTA may use, which is what a kernel's tiles must fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    name: str            # "sm90", or "cpu" for the Triton interpreter
    cc: int              # compute capability as an int (90); 0 for cpu
    sms: int             # streaming multiprocessors (the common SKU)
    smem_per_block: int  # bytes of shared memory one CTA may use
    regs_per_sm: int
    mma: str             # tensor-core instruction family Triton emits
    fp8: bool


ARCHS = {
    "sm80": Arch("sm80", 80, 108, 163 * 1024, 65536, "mma.sync", False),    # A100
    "sm86": Arch("sm86", 86, 84, 99 * 1024, 65536, "mma.sync", False),      # A10/RTX 30
    "sm89": Arch("sm89", 89, 128, 99 * 1024, 65536, "mma.sync", True),      # L40/RTX 40
    "sm90": Arch("sm90", 90, 132, 227 * 1024, 65536, "wgmma", True),        # H100 SXM
    "sm100": Arch("sm100", 100, 148, 227 * 1024, 65536, "tcgen05", True),   # B200
    "cpu": Arch("cpu", 0, 1, 1 << 30, 1 << 30, "interpreter", False),
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
