"""Ahead-of-time compilation of a recorded launch for any GPU arch, on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole Triton
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) on the CPU; the result's metadata reports the
shared memory the kernel needs, which must fit the arch's per-block limit; ``ptxas -v`` on its PTX
gives the registers per thread and the bytes spilled.
"""
from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .arch import ARCHS, Arch
from .launch import LaunchRecord


@dataclass(frozen=True)
class AotReport:
    kernel: str
    arch: str
    shared: int
    smem_limit: int
    mma: str       # tensor-core instruction family found in the PTX ("" if none)
    ptx: str

    @property
    def fits(self) -> bool:
        return self.shared <= self.smem_limit

    @property
    def tma(self) -> bool:
        """Whether the kernel issues TMA bulk tensor copies (tensor-descriptor loads on sm90+)."""
        return "cp.async.bulk.tensor" in self.ptx

    @property
    def registers(self) -> int:
        """Registers per thread, as ptxas allocates them (ptxas runs on the PTX: no GPU needed)."""
        return ptxas_usage(self.ptx)[0]

    @property
    def spills(self) -> int:
        """Bytes of register spill stores and loads (0: everything lives in registers)."""
        return ptxas_usage(self.ptx)[1]


@functools.lru_cache(maxsize=256)
def ptxas_usage(ptx: str) -> tuple[int, int]:
    """``(registers, spill bytes)`` of the PTX's kernel, from ``ptxas -v`` (the ptxas Triton ships)."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    cc = int(re.match(r"sm_(\d+)", target).group(1))
    from triton.backends.nvidia import compiler as nv
    tool = nv.get_ptxas(cc) if hasattr(nv, "get_ptxas") else nv.knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        got = subprocess.run([tool.path, "-v", f"--gpu-name={target}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    info = got.stderr + got.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return (int(regs.group(1)) if regs else 0), spills


_MMA_MARKERS = (("tcgen05", "tcgen05"), ("wgmma", "wgmma"), ("mma.sync", "mma.sync"))


def compile_launch(record: LaunchRecord, arch: str | Arch) -> AotReport:
    """Compile the kernel of ``record`` with its signature and constexprs for ``arch``, with the
    specializations the JIT would make for the recorded values (ints equal to 1 as constants,
    16-divisible ints and addresses marked so): without them Triton cannot prove the loads
    contiguous, does not pipeline them, and reports far less shared memory than a real launch."""
    arch = ARCHS[arch] if isinstance(arch, str) else arch
    fn = record.kernel.function(interpret=False)
    signature = dict(record.signature)
    constexprs = dict(record.constexprs)
    spec = getattr(record, "specialization", {}) or {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name not in signature:           # an argument passed as None
            signature[name] = "constexpr"
            constexprs[name] = None
        elif spec.get(name) == "1" and not signature[name].startswith("*"):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif spec.get(name) == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature = {n: signature[n] for n in fn.arg_names}
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch.cc, 32),
                              options={"num_warps": record.num_warps, "num_stages": record.num_stages})
    ptx = compiled.asm["ptx"]
    mma = next((name for name, marker in _MMA_MARKERS if marker in ptx), "")
    return AotReport(record.kernel.fn_name, arch.name, compiled.metadata.shared, arch.smem_per_block, mma, ptx)
