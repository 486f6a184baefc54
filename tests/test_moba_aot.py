"""The MoBA kernels compile ahead of time for sm80, sm90 and sm100 on this GPU-less machine, fit the
arch's shared memory, and use its tensor-core instructions for 16-bit operands.

- The instances the interpreter tests run (CPU tiles; fp32 exact dots, fp16, varlen, GQA, top_k = 1,
  kconv) are recorded from a small workload and compiled for every arch.
- The GPU tile table (`moec.passes.moba_tiles`): the benchmark configuration (bf16, D = 128,
  block 128, top-k 8, varlen, GQA) compiles for every arch, with launches planned on ``meta``
  tensors (nothing runs); every table entry's pipelined shared-memory estimate fits every arch.
  ``HYPOTHESIS_PROFILE=large`` (``make test-large``) compiles the whole table: block sizes 64 to
  512, D = 64 and 128, fp16 and bf16.
- The densify scheme (one kernel: windows owning their rows' softmax state): its instances for block
  sizes 64, 128, 256 and 512 with each arch's table tiles compile for sm80, sm90 and sm100 in bf16
  (D = 128, top-k 8, varlen, GQA), fit shared memory, use the arch's tensor cores, spill no registers,
  keep their key loop pipelined (async copies inside it) and order the window's state with barriers;
  the large profile adds D = 64, fp16 and fixed-length sequences.
"""
from __future__ import annotations

import os

import pytest
import torch

from aot_util import ARCHS, distinct_launches, record_launches
from moec.ops import moba_forward_kernels
from moec.runtime.aot import compile_launch
from moec.runtime.arch import ARCHS as ARCH_INFO, GPU_ARCHS
from moec.ir.tiles import pow2
from moec.passes.moba_tiles import attention_smem, attention_tile, densify_tile, gate_smem, gate_tile
from moec.runtime.moba_attention_kernel import plan_attention
from moec.runtime.moba_gate_kernel import plan_gate
from moec.runtime.moba_window_kernel import plan_window

pytestmark = [pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

FULL = os.environ.get("HYPOTHESIS_PROFILE") == "large"


def uses_dot(record) -> bool:
    return "BLOCK_N" in record.constexprs or record.constexprs["K1"] > 0      # the gate with top_k=1: no dot


def check(record, arch):
    report = compile_launch(record, arch)
    where = f"{record.kernel.fn_name} {record.signature['q_ptr']} {record.constexprs} on {arch}"
    assert report.fits, f"{where}: {report.shared} > {report.smem_limit} bytes of shared memory"
    if record.signature["q_ptr"] in ("*fp16", "*bf16") and uses_dot(record):
        assert report.mma == ARCH_INFO[arch].mma, f"{where}: {report.mma!r}"
    return report


@pytest.fixture(scope="module")
def test_instances():
    def workload():
        torch.manual_seed(0)
        # fp32 (exact dots), top_k = 1 (the gate's top-k pruned), batch 2; fp16 varlen, GQA, kconv
        cases = [(torch.float32, 1, 16, None, None, 2), (torch.float16, 3, 16, [0, 20, 50], 3, 1)]
        for dtype, top_k, bs, cu, kc, B in cases:
            q, k = torch.randn(B, 4, 50, 32).to(dtype), torch.randn(B, 2, 50, 32).to(dtype)
            for scheme in ("rows", "densify"):
                moba_forward_kernels(q, k, k, block_size=bs, top_k=top_k,
                                     cu_seqlens=torch.tensor(cu, dtype=torch.int32) if cu else None,
                                     kconv_weight=torch.randn(2, 32, kc) if kc else None, scheme=scheme)
    return distinct_launches(record_launches(workload))


@pytest.mark.parametrize("arch", ARCHS)
def test_interpreter_instances_compile(test_instances, arch):
    assert len(test_instances) == 6          # gate, rows attention, densify; two cases each
    for record in test_instances:
        check(record, arch)


def table_records(arch, block_size, dtype=torch.bfloat16, D=128, top_k=8, varlen=True, H=16, Hkv=4, N=8192):
    """The launches of one forward with ``arch``'s table tiles, planned on meta tensors."""
    meta = dict(device="meta", dtype=dtype)
    q, k = torch.empty(1, H, N, D, **meta), torch.empty(1, Hkv, N, D, **meta)
    cu = torch.empty(3, dtype=torch.int32, device="meta") if varlen else None
    pooled = torch.empty(1, Hkv, N // block_size + 2, D, **meta)
    idx = torch.empty(1, H, N, top_k, dtype=torch.int32, device="meta")
    gate, _ = plan_gate(q, pooled, block_size=block_size, top_k=top_k, tile=gate_tile(block_size, D, arch),
                        cu_seqlens=cu)
    attn, _, _ = plan_attention(q, k, k, idx, block_size=block_size, tile=attention_tile(block_size, D, arch),
                                cu_seqlens=cu)
    return [gate.record(), attn.record()]


@pytest.mark.parametrize("arch", ARCHS)
def test_benchmark_tiles_compile(arch):
    records = table_records(arch, 128)
    assert records[1].constexprs["BLOCK_M"] >= 64          # wgmma / tcgen05 need M >= 64
    for record in records:
        check(record, arch)


@pytest.mark.skipif(not FULL, reason="the whole tile table compiles under HYPOTHESIS_PROFILE=large")
@pytest.mark.parametrize("arch", GPU_ARCHS)
@pytest.mark.parametrize("block_size", [64, 128, 256, 512])
def test_whole_table_compiles(arch, block_size):
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            for record in table_records(arch, block_size, dtype=dtype, D=D, varlen=block_size != 64):
                check(record, arch)


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_table_shared_memory_estimate(arch):
    """Every entry, pipelined K and V chunks plus the resident q tile (16-bit), fits with 10% spare."""
    limit = ARCH_INFO[arch].smem_per_block * 0.9
    for bs in (16, 64, 128, 256, 512, 1024):
        for D in (64, 128, 256):
            t = attention_tile(bs, D, arch)
            assert t.block_n <= pow2(bs) and t.block_m >= 64
            assert attention_smem(t, D) <= limit, (arch, bs, D, t)
            g = gate_tile(bs, D, arch)
            assert gate_smem(g, D) <= limit, (arch, bs, D, g)


def densify_record(arch, block_size, dtype=torch.bfloat16, D=128, top_k=8, varlen=True, H=16, Hkv=4, N=8192):
    """The densify scheme's launch with ``arch``'s table tile, planned on meta tensors."""
    meta = dict(device="meta", dtype=dtype)
    q, k = torch.empty(1, H, N, D, **meta), torch.empty(1, Hkv, N, D, **meta)
    cu = torch.empty(3, dtype=torch.int32, device="meta") if varlen else None
    idx = torch.empty(1, H, N, top_k, dtype=torch.int32, device="meta")
    plan, _, _ = plan_window(q, k, k, idx, block_size=block_size, tile=densify_tile(block_size, D, arch),
                             cu_seqlens=cu)
    return plan.record()


def check_densify(record, arch):
    report = check(record, arch)
    where = f"{record.kernel.fn_name} {record.signature['q_ptr']} {record.constexprs} on {arch}"
    assert report.spills == 0, f"{where}: {report.spills} bytes of register spills"
    assert "cp.async" in report.ptx, f"{where}: key and value chunks not copied asynchronously (not pipelined)"
    assert "bar.sync" in report.ptx or "barrier.sync" in report.ptx, f"{where}: no barrier orders the state"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [64, 128, 256, 512])
def test_densify_tiles_compile(arch, block_size):
    record = densify_record(arch, block_size)
    assert record.kernel.fn_name.startswith("moec_moba_window")
    assert record.constexprs["BLOCK_M"] >= ARCH_INFO[arch].fast_mma_min_m
    check_densify(record, arch)
    if FULL:
        for dtype in (torch.float16, torch.bfloat16):
            for D in (64, 128):
                for varlen in (False, True):
                    check_densify(densify_record(arch, block_size, dtype=dtype, D=D, varlen=varlen), arch)


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_densify_table_shared_memory_estimate(arch):
    limit = ARCH_INFO[arch].smem_per_block * 0.9
    for bs in (16, 64, 128, 256, 512, 1024):
        for D in (64, 128, 256):
            t = densify_tile(bs, D, arch)
            assert t.block_n <= pow2(bs) and t.block_m >= 64 and t.window % t.block_m == 0
            assert attention_smem(t, D) <= limit, (arch, bs, D, t)
