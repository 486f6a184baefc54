"""Every launch of an MoE layer's expert kernels compiles for sm80, sm90 and sm100, fits in
shared memory, and uses the arch's tensor-core instructions where the tile allows them.

The layer runs once on CPU under the interpreter with fp16 tensors (recording its launches);
each distinct launch is then compiled ahead of time as recorded (fp16) and re-typed to bf16.
"""
from __future__ import annotations

import math

import pytest
import torch

from aot_util import ARCHS, compile_all, distinct_launches, record_launches, retyped
from moec.runtime.dispatch import dispatch
from moec.runtime.grouped_gemm_kernel import GroupedGemmParams, grouped_gemm
from moec.runtime.reduce_kernel import ReduceParams, reduce_topk
from moec.ir.tiles import GemmTile, RowTile

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

# (tile, glu, shared): a small decode-style tile (mma.sync everywhere) and two tiles big enough for
# sm90 wgmma / sm100 tcgen05 (BLOCK_M >= 64).
CONFIGS = [
    (GemmTile(16, 32, 32, num_warps=4, num_stages=2), True, True),
    (GemmTile(64, 64, 32, num_warps=4, num_stages=3), False, False),
    (GemmTile(128, 64, 32, num_warps=8, num_stages=3), True, False),
]


def moe_layer_fp16(tile: GemmTile, glu: bool, shared: bool, T=24, E=4, k=2, d=64, f=48, fs=32):
    """The routed experts (+ a gated shared expert) of one fp16 layer, through the kernels."""
    dt = torch.float16
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dt)

    x = torch.randn(T, d, generator=g).to(dt)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[0, -1] = -1
    weights = torch.rand(T, k, generator=g)
    order, offsets = dispatch(ids, E)
    up = GroupedGemmParams(E, f, d, "silu", glu, gather_top_k=k, out_dtype=dt, tile=tile)
    h = torch.empty(T * k, f, dtype=dt)
    grouped_gemm(x, rnd(E, f, d), up, out=h, offsets=offsets, order=order, w_up=rnd(E, f, d) if glu else None)
    down = GroupedGemmParams(E, d, f, scatter=True, scale=True, tile=tile)
    y_pair = torch.empty(T * k, d)
    grouped_gemm(h, rnd(E, f, d).transpose(1, 2), down, out=y_pair, offsets=offsets, order=order,
                 scale_vec=weights.reshape(-1))
    residual = None
    if shared:
        hs = torch.empty(T, fs, dtype=dt)
        grouped_gemm(x, rnd(fs, d), GroupedGemmParams(1, fs, d, "gelu", glu, out_dtype=dt, tile=tile), out=hs,
                     w_up=rnd(fs, d) if glu else None)
        residual = torch.empty(T, d)
        grouped_gemm(hs, rnd(d, fs), GroupedGemmParams(1, d, fs, scale=True, tile=tile), out=residual,
                     scale_vec=torch.rand(T, generator=g))
    y = torch.empty(T, d, dtype=dt)
    reduce_topk(y_pair, ReduceParams(k, d, residual is not None, dt, RowTile(16, 64)), out=y, ids=ids,
                residual=residual)
    return y


def expected_mma(record, arch: str) -> str:
    """The tensor-core family Triton 3.9 emits for our kernels (fp16/bf16 operands)."""
    if "BLOCK_M" not in record.constexprs:          # the reduce: no dot
        return ""
    if arch == "sm80" or record.constexprs["BLOCK_M"] < 64:
        return "mma.sync"
    return {"sm90": "wgmma", "sm100": "tcgen05"}[arch]


@pytest.fixture(scope="module")
def launches():
    records = record_launches(lambda: [moe_layer_fp16(*c) for c in CONFIGS])
    return distinct_launches(records)


def test_recorded_every_kernel(launches):
    names = {r.kernel.fn_name for r in launches}
    assert {"grouped_gemm_gather_silu_glu", "grouped_gemm_gather_silu", "grouped_gemm_linear_scaled_scatter",
            "grouped_gemm_gelu_glu", "grouped_gemm_linear_scaled", "reduce_topk", "reduce_topk_residual"} <= names
    assert all("*fp16" in r.signature.values() for r in launches)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compiles_fits_and_uses_tensor_cores(launches, dtype):
    records = launches if dtype == "fp16" else [retyped(r, "fp16", "bf16") for r in launches]
    assert dtype == "fp16" or all("*fp16" not in r.signature.values() for r in records)
    for record, report in compile_all(records, ARCHS):
        where = f"{record.kernel.fn_name} {record.constexprs.get('BLOCK_M')} {report.arch} {dtype}"
        assert report.fits, f"{where}: {report.shared} > {report.smem_limit} bytes of shared memory"
        assert report.mma == expected_mma(record, report.arch), f"{where}: got {report.mma!r}"
        if dtype == "bf16" and report.mma == "mma.sync":
            assert "bf16" in report.ptx


@pytest.mark.parametrize("arch", ["sm80", "sm90", "sm100"])
@pytest.mark.parametrize("persistent", [0, 2])
@pytest.mark.parametrize("layout", ["linear", "stacked"])
def test_scheduled_and_persistent_grouped_gemm_compile(arch, persistent, layout, monkeypatch):
    """The grouped GEMM reading the tile schedule, one program per tile or persistent (programs looping over
    tiles up to the schedule's count), compiles for each arch within shared memory, without spills, on the
    arch's fast tensor cores for a 64-row tile, and on sm90 / sm100 with its weight tiles by TMA (bulk tensor
    copies) from ``nn.Linear``-layout ``[E, N, K]`` or stacked ``[E, K, N]`` weights; so does the schedule
    kernel the dispatch runs."""
    if arch in ("sm90", "sm100"):
        monkeypatch.setenv("MOEC_TMA", "1")     # what a launch on such a GPU does (recorded on the CPU here)
    from moec.runtime import aot, launch
    from moec.runtime.schedule_kernel import ScheduleParams, tile_schedule
    g = torch.Generator().manual_seed(0)
    E, K, N, T, k = 16, 128, 64, 8, 2
    x = torch.randn(T, K, generator=g).half()
    if layout == "linear":
        w, w_up = (torch.randn(E, N, K, generator=g).half() for _ in range(2))
    else:
        w, w_up = (torch.randn(E, K, N, generator=g).half().transpose(1, 2) for _ in range(2))
    order, offsets = dispatch(torch.randint(0, E, (T, k), generator=g, dtype=torch.int32), E)
    params = GroupedGemmParams(E, N, K, "silu", True, gather_top_k=k, out_dtype=torch.float16,
                               tile=GemmTile(64, 64, 64, 4, 3, persistent=persistent))
    with launch.recording() as records:
        sched = tile_schedule(offsets, T * k, ScheduleParams(E, 64))
        grouped_gemm(x, w, params, out=torch.empty(T * k, N, dtype=torch.float16), offsets=offsets, order=order,
                     w_up=w_up, schedule=sched)
    assert [r.kernel.fn_name for r in records] == ["tile_schedule_m64", "grouped_gemm_gather_silu_glu"]
    assert records[1].constexprs["HAS_SCHEDULE"] and records[1].constexprs["PERSISTENT"] == bool(persistent)
    tma = arch != "sm80"
    assert records[1].constexprs["W_DESC"] == (0 if not tma else 1 if layout == "linear" else 2)
    for rec in records:
        report = aot.compile_launch(rec, arch)
        assert report.fits and report.spills == 0, (rec.kernel.fn_name, arch, report.shared, report.spills)
    gemm = aot.compile_launch(records[1], arch)
    assert gemm.mma == {"sm80": "mma.sync", "sm90": "wgmma", "sm100": "tcgen05"}[arch]
    assert gemm.tma == tma
