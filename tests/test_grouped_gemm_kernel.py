"""The expert kernels: dispatch, the grouped GEMM (gather / GLU / scale / scatter) and the top-k reduce.

They run under the Triton interpreter on CPU tensors. The main property composes them into one
MoE layer exactly as the lowering does and compares with the eager reference `moec.reference.moe`:

    dispatch(ids) -> (order, offsets)
    h      = grouped_gemm(x, w_gate|w_up, gather_top_k=k, act, glu)        # rows in expert order
    y_pair = grouped_gemm(h, w_down, scatter, scale=weights)               # rows in pair order
    shared = grouped_gemm(x, ...) dense, then down with the sigmoid gate as per-row scale
    y      = reduce_topk(y_pair, ids, residual=shared)
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moec import reference
from moec.runtime import launch
from moec.runtime.dispatch import dispatch
from moec.runtime.grouped_gemm_kernel import (ACTIVATION_EXPR, GroupedGemmLaunch, GroupedGemmParams, grid_rows, grouped_gemm,
                                             render_grouped_gemm)
from moec.runtime.reduce_kernel import ReduceParams, reduce_topk, render_reduce
from moec.ir.interp import tile_schedule as reference_schedule
from moec.runtime.schedule_kernel import ScheduleParams, tile_schedule
from moec.ir.tiles import GemmTile, RowTile
from moec.spec import ACTIVATIONS, MoESpec, MoEWeights, RouterConfig, SharedExpertConfig

# silu / gelu_tanh are x / (1 + exp(-z)): exp overflows to inf for very negative z and the result is the
# right -0 / 0; numpy (the interpreter) warns about the overflow, a GPU does not.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TILES = [GemmTile(16, 16, 16), GemmTile(16, 32, 32, group_m=1), GemmTile(32, 64, 16), GemmTile(32, 16, 32, group_m=3),
         GemmTile(16, 64, 32, group_m=64), GemmTile(32, 32, 16, group_m=2)]
ROW_TILES = [RowTile(16, 64), RowTile(4, 16), RowTile(32, 32)]
NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# building a layer and running it through the kernels

def make_layer(E, k, d, f, *, glu, act, dtype=torch.float32, seed=0, transposed=False, shared=None,
               gated=False, capacity=None, one_expert=None):
    """A random layer (weights scaled to keep activations O(1)) and its spec.

    ``transposed``: expert weights are stored ``[E, in, out]`` and handed over as ``.transpose(1, 2)``
    views. ``one_expert``: a router bias that sends every token's first choice to that expert.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(dtype)

    def expert(out, inp):
        if transposed:
            return rnd(E, inp, out, fan_in=inp).transpose(1, 2)
        return rnd(E, out, inp, fan_in=inp)

    cfg = RouterConfig(E, k, capacity_factor=capacity, router_bias=one_expert is not None)
    spec = MoESpec(d, f, cfg, activation=act, glu=glu,
                   shared=SharedExpertConfig(shared, gated) if shared else None)
    w = MoEWeights(w_router=rnd(E, d, fan_in=1), w_up=expert(f, d), w_down=expert(d, f),
                   w_gate=expert(f, d) if glu else None)
    if one_expert is not None:
        w.b_router = torch.zeros(E)
        w.b_router[one_expert] = 1e4
    if shared:
        w.shared_up = rnd(shared, d, fan_in=d)
        w.shared_down = rnd(d, shared, fan_in=shared)
        w.shared_gate = rnd(shared, d, fan_in=d) if glu else None
        w.shared_gate_proj = rnd(1, d, fan_in=d) if gated else None
    return spec, w


def routing(x, w, spec):
    logits = reference.router_logits(x, w.w_router, w.b_router)
    ids, weights, _ = reference.route(logits, spec.router)
    return ids, weights


def moe_kernels(x, w, spec, ids, weights, *, tile, row_tile=RowTile(16, 64), h_dtype=None, scheduled=False,
                tma=False):
    """The layer on the kernels; intermediate buffers are poisoned with NaN so any read of a row
    that was never written (a dropped pair) shows up. ``scheduled``: the routed GEMMs read the tile
    schedule (poisoned past its tile count too); ``tma``: weight tiles by tensor descriptors where the
    layout allows (sm90+'s TMA; the interpreter runs them too)."""
    T, d = x.shape
    E, k, f = spec.num_experts, spec.top_k, spec.ffn
    h_dtype = h_dtype or x.dtype
    order, offsets = dispatch(ids, E)
    sched = None
    if scheduled:
        sched = torch.full((3 * T * k + 1,), -(2 ** 30), dtype=torch.int32)
        got = tile_schedule(offsets, T * k, ScheduleParams(E, tile.block_m))
        n = got[0].item()
        for part in range(3):
            sched[1 + part * T * k:1 + part * T * k + n] = got[1 + part * T * k:1 + part * T * k + n]
        sched[0] = n
    up = GroupedGemmParams(E, f, d, spec.activation, spec.glu, gather_top_k=k, out_dtype=h_dtype, tile=tile,
                           header="h = expert_up(x, order, offsets)", tma=tma)
    h = torch.full((T * k, f), NAN, dtype=h_dtype)
    grouped_gemm(x, w.w_gate if spec.glu else w.w_up, up, out=h, offsets=offsets, order=order,
                 w_up=w.w_up if spec.glu else None, schedule=sched)
    down = GroupedGemmParams(E, d, f, scatter=True, scale=True, tile=tile, tma=tma)
    y_pair = torch.full((T * k, d), NAN)
    grouped_gemm(h, w.w_down, down, out=y_pair, offsets=offsets, order=order, scale_vec=weights.reshape(-1),
                 schedule=sched)
    residual = None
    if spec.shared is not None:
        fs = spec.shared.width
        sup = GroupedGemmParams(1, fs, d, spec.activation, spec.glu, out_dtype=h_dtype, tile=tile)
        hs = torch.full((T, fs), NAN, dtype=h_dtype)
        grouped_gemm(x, w.shared_gate if spec.glu else w.shared_up, sup, out=hs,
                     w_up=w.shared_up if spec.glu else None)
        gate = torch.sigmoid(x.float() @ w.shared_gate_proj.float().t()).reshape(-1) if spec.shared.gated else None
        sdown = GroupedGemmParams(1, d, fs, scale=gate is not None, tile=tile)
        residual = torch.full((T, d), NAN)
        grouped_gemm(hs, w.shared_down, sdown, out=residual, scale_vec=gate)
    y = torch.full((T, d), NAN, dtype=x.dtype)
    reduce_topk(y_pair, ReduceParams(k, d, residual is not None, x.dtype, row_tile), out=y, ids=ids,
                residual=residual)
    return y


def check_close(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert not torch.isnan(y).any()
    if y.numel() == 0:
        return
    err = (y.float() - ref.float()).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * max(1.0, ref.float().abs().max().item()), err
    else:
        assert err <= 1e-2 * max(1e-3, ref.float().norm().item() / math.sqrt(ref.numel())) + 2e-3, err


# ----------------------------------------------------------------------------------------------
# end to end: the three kernels composing one MoE layer against the eager reference

@st.composite
def layers(draw):
    E = draw(st.integers(1, 9))
    return dict(
        T=draw(st.sampled_from([0, 1, 2, 5, 16, 17, 33])),
        E=E, k=draw(st.integers(1, min(E, 4))),
        d=draw(st.sampled_from([8, 16, 24, 40, 64, 80])),
        f=draw(st.sampled_from([8, 16, 20, 32, 48, 80])),
        glu=draw(st.booleans()), act=draw(st.sampled_from(ACTIVATIONS)),
        tile=dataclasses.replace(draw(st.sampled_from(TILES)), persistent=draw(st.sampled_from([0, 0, 1, 3]))),
        scheduled=draw(st.booleans()), tma=draw(st.booleans()), row_tile=draw(st.sampled_from(ROW_TILES)),
        transposed=draw(st.booleans()), strided_x=draw(st.booleans()),
        capacity=draw(st.sampled_from([None, None, 0.5, 1.0])),
        shared=draw(st.sampled_from([None, None, 8, 24])), gated=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def run_layer(p, dtype=torch.float32, h_dtype=None):
    spec, w = make_layer(p["E"], p["k"], p["d"], p["f"], glu=p["glu"], act=p["act"], dtype=dtype, seed=p["seed"],
                         transposed=p["transposed"], shared=p["shared"], gated=p["gated"], capacity=p["capacity"],
                         one_expert=p.get("one_expert"))
    g = torch.Generator().manual_seed(p["seed"] + 1)
    T, d = p["T"], p["d"]
    if p["strided_x"]:   # rows 3*d apart, columns 2 apart
        x = torch.randn(T, 3 * d, generator=g).to(dtype)[:, 1:2 * d + 1:2]
        assert x.stride() == (3 * d, 2)
    else:
        x = torch.randn(T, d, generator=g).to(dtype)
    ids, weights = routing(x, w, spec)
    y = moe_kernels(x, w, spec, ids, weights, tile=p["tile"], row_tile=p["row_tile"], h_dtype=h_dtype,
                    scheduled=p.get("scheduled", False), tma=p.get("tma", False))
    ref, _ = reference.moe(x, w, spec)
    check_close(y, ref, dtype)
    return ids


@settings(max_examples=30, **SETTINGS)
@given(layers())
def test_moe_layer_fp32(p):
    run_layer(p)


@settings(max_examples=10, **SETTINGS)
@given(layers())
def test_moe_layer_fp16(p):
    run_layer(p, torch.float16)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("glu", [False, True])
def test_each_activation(act, glu):
    run_layer(dict(T=9, E=3, k=2, d=24, f=40, glu=glu, act=act, tile=GemmTile(16, 32, 16), row_tile=RowTile(16, 64),
                   transposed=False, strided_x=False, capacity=None, shared=None, gated=False, seed=7))


def test_activation_table_covers_spec():
    assert set(ACTIVATION_EXPR) == {None, *ACTIVATIONS}


BASE = dict(d=40, f=24, glu=True, act="silu", tile=GemmTile(16, 32, 32), row_tile=RowTile(16, 64),
            transposed=False, strided_x=False, capacity=None, shared=None, gated=False, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_tokens_to_one_expert(dtype):
    ids = run_layer(dict(BASE, T=33, E=6, k=1, one_expert=4), dtype)
    assert (ids == 4).all()


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_batches_and_idle_experts(T):
    ids = run_layer(dict(BASE, T=T, E=9, k=2, shared=16, gated=True))
    assert len(set(ids.reshape(-1).tolist())) <= 2          # 7 or more experts get no tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropped_pairs(dtype):
    ids = run_layer(dict(BASE, T=33, E=4, k=2, capacity=0.5, transposed=True, strided_x=True), dtype)
    assert (ids == reference.DROPPED).sum() >= 66 - 4 * 9   # capacity ceil(0.5 * 66 / 4) = 9 per expert


def test_fp16_with_fp32_intermediate():
    run_layer(dict(BASE, T=17, E=5, k=3, shared=24, gated=True), torch.float16, h_dtype=torch.float32)


@pytest.mark.parametrize("tile", [GemmTile(bm, bn, bk) for bm in (16, 32) for bn in (16, 32, 64) for bk in (16, 32)])
def test_tiles(tile):
    run_layer(dict(BASE, T=17, E=3, k=2, d=80, f=48, tile=tile, transposed=True, capacity=1.0))


# ----------------------------------------------------------------------------------------------
# the grouped GEMM on its own

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [0, 1, 37])
def test_dense_single_expert_with_row_scale(dtype, M):
    """The shared expert: offsets=None, one [N, K] weight (a transposed view), a per-row scale."""
    g = torch.Generator().manual_seed(M)
    K, N = 72, 40
    a = torch.randn(M, 2 * K, generator=g).to(dtype)[:, ::2]
    w = torch.randn(K, N, generator=g).to(dtype).t()                 # [N, K] view, strides (1, N)
    scale = torch.rand(M, generator=g)
    buf = torch.full((M, N + 8), NAN, dtype=dtype)
    out = buf[:, 3:N + 3]                                            # a strided view of a wider buffer
    params = GroupedGemmParams(1, N, K, "gelu_tanh", scale=True, out_dtype=dtype, tile=GemmTile(32, 16, 32))
    assert grouped_gemm(a, w, params, out=out, scale_vec=scale) is out
    ref = reference.activation("gelu_tanh", a.float() @ w.float().t()) * scale[:, None]
    check_close(out, ref.to(dtype), dtype)
    assert torch.isnan(buf[:, :3]).all() and torch.isnan(buf[:, N + 3:]).all()


def test_unscaled_no_activation_sorted_rows():
    """No gather, no scatter: rows already in expert order (offsets only)."""
    g = torch.Generator().manual_seed(0)
    E, K, N = 4, 24, 20
    counts = [5, 0, 19, 2]
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    M = sum(counts) + 3                                   # 3 trailing rows belong to no expert
    a = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    out = torch.full((M, N), NAN)
    grouped_gemm(a, w, GroupedGemmParams(E, N, K, tile=GemmTile(16, 16, 16)), out=out, offsets=offsets)
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        torch.testing.assert_close(out[lo:hi], a[lo:hi] @ w[e].t(), rtol=1e-5, atol=1e-4)
    assert torch.isnan(out[sum(counts):]).all()            # rows of no expert are not written


@settings(max_examples=200, **SETTINGS)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=12), st.sampled_from([16, 32, 64, 128]),
       st.integers(0, 20))
def test_grid_bounds_the_tiles(counts, bm, dropped):
    """The data-independent routed grid covers sum_e cdiv(count_e, BLOCK_M) for any counts."""
    m = sum(counts) + dropped
    params = GroupedGemmParams(len(counts), 16, 16, tile=GemmTile(bm, 16, 16))
    assert grid_rows(params, m, routed=True) >= sum(-(-c // bm) for c in counts)


@pytest.mark.parametrize("group_m", [1, 2, 3, 5, 64])
def test_grouped_program_order_covers_every_tile_once(group_m):
    """Any GROUP_M (a last, partial group; surplus row tiles of the routed grid) visits each (row tile,
    N tile) exactly once: every row of every expert is written, with its own expert's product."""
    g = torch.Generator().manual_seed(group_m)
    E, K, N = 5, 16, 80                                   # 5 N tiles of 16
    counts = [40, 0, 7, 33, 17]                           # 3 + 0 + 1 + 3 + 2 row tiles of 16, 9 launched
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    M = sum(counts)
    a, w = torch.randn(M, K, generator=g), torch.randn(E, N, K, generator=g)
    out = torch.full((M, N), NAN)
    params = GroupedGemmParams(E, N, K, tile=GemmTile(16, 16, 16, group_m=group_m))
    with launch.recording() as rec:
        grouped_gemm(a, w, params, out=out, offsets=offsets)
    assert rec[0].grid == (grid_rows(params, M, routed=True) * 5,)
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        torch.testing.assert_close(out[lo:hi], a[lo:hi] @ w[e].t(), rtol=1e-5, atol=1e-4)


@settings(max_examples=60, **SETTINGS)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=40), st.sampled_from([16, 32, 64, 128]), st.integers(0, 9))
def test_tile_schedule_kernel(counts, bm, dropped):
    """The schedule kernel lists every expert's row tiles in expert order, with their first rows and row
    ends, as the reference interpreter computes them (`moec.ir.interp.tile_schedule`), for any counts, idle
    experts and dropped pairs (past offsets[E])."""
    E, M = len(counts), sum(counts) + dropped
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    got = tile_schedule(offsets, M, ScheduleParams(E, bm))
    want = reference_schedule(offsets, M, bm)
    n = want[0].item()
    assert got[0].item() == n <= grid_rows(GroupedGemmParams(E, 16, 16, tile=GemmTile(bm, 16, 16)), M, routed=True)
    for part in range(3):
        assert torch.equal(got[1 + part * M:1 + part * M + n], want[1 + part * M:1 + part * M + n])


@pytest.mark.parametrize("persistent", [0, 1, 4])
@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("group_m", [1, 3, 64])
def test_persistent_and_scheduled_tiles_cover_every_tile_once(persistent, scheduled, group_m):
    """A persistent grid (``persistent`` programs per SM: the interpreter has one) loops over every
    (row tile, N tile) once, with or without the tile schedule; so does the one-program-per-tile grid
    reading the schedule. Rows of dropped pairs (past offsets[E]) stay unwritten."""
    g = torch.Generator().manual_seed(group_m)
    E, K, N = 5, 16, 80
    counts = [40, 0, 7, 33, 17]
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    M = sum(counts) + 3                                   # 3 dropped pairs
    a, w = torch.randn(M, K, generator=g), torch.randn(E, N, K, generator=g)
    out = torch.full((M, N), NAN)
    params = GroupedGemmParams(E, N, K, tile=GemmTile(16, 16, 16, group_m=group_m, persistent=persistent))
    sched = tile_schedule(offsets, M, ScheduleParams(E, 16)) if scheduled else None
    with launch.recording() as rec:
        grouped_gemm(a, w, params, out=out, offsets=offsets, schedule=sched)
    tiles = grid_rows(params, M, routed=True) * 5
    assert rec[0].grid == ((min(tiles, persistent) if persistent else tiles),)
    assert rec[0].constexprs["HAS_SCHEDULE"] == scheduled and rec[0].constexprs["PERSISTENT"] == bool(persistent)
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        torch.testing.assert_close(out[lo:hi], a[lo:hi] @ w[e].t(), rtol=1e-5, atol=1e-4)
    assert torch.isnan(out[M - 3:]).all()


@pytest.mark.parametrize("M", [0, 1, 37])
def test_persistent_dense_gemm(M):
    """A dense GEMM (no offsets) with a persistent tile: programs loop over cdiv(M, BLOCK_M) x N tiles."""
    g = torch.Generator().manual_seed(M)
    a, w = torch.randn(M, 24, generator=g), torch.randn(40, 24, generator=g)
    out = torch.full((M, 40), NAN)
    grouped_gemm(a, w, GroupedGemmParams(1, 40, 24, "silu", tile=GemmTile(16, 16, 16, persistent=2)), out=out)
    torch.testing.assert_close(out, reference.activation("silu", a @ w.t()), rtol=1e-5, atol=1e-5)


def test_schedule_argument_checks():
    a, w = torch.randn(4, 8), torch.randn(2, 16, 8)
    order, offsets = dispatch(torch.zeros(4, 1, dtype=torch.int32), 2)
    params = GroupedGemmParams(2, 16, 8, gather_top_k=1)
    with pytest.raises(ValueError, match="schedule must be int32"):
        grouped_gemm(a, w, params, out=torch.empty(4, 16), offsets=offsets, order=order,
                     schedule=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="schedule needs offsets"):
        grouped_gemm(a, w[:1], GroupedGemmParams(1, 16, 8), out=torch.empty(4, 16),
                     schedule=torch.zeros(13, dtype=torch.int32))
    with pytest.raises(ValueError, match="offsets must be int32"):
        tile_schedule(offsets.long(), 4, ScheduleParams(2, 16))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        ScheduleParams(2, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["gpt_oss", "rows", "apart"])
def test_interleaved_gate_up_is_one_load(dtype, layout):
    """Gate and up as the even / odd columns of GPT-OSS's ``gate_up [E, K, 2N]`` (or rows of an
    ``[E, 2N, K]``): the launch loads both tiles at once; same-strided views of two tensors do not."""
    g = torch.Generator().manual_seed(1)
    E, K, N, T, k = 3, 40, 24, 11, 2
    if layout == "gpt_oss":
        gate_up = torch.randn(E, K, 2 * N, generator=g).to(dtype)
        w, w_up = gate_up[..., 0::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2)
    else:
        gate_up = torch.randn(E, 2 * N, K, generator=g).to(dtype)
        w, w_up = gate_up[:, 0::2], gate_up[:, 1::2]
        if layout == "apart":
            w_up = gate_up.clone()[:, 1::2]
    x = torch.randn(T, K, generator=g).to(dtype)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    order, offsets = dispatch(ids, E)
    params = GroupedGemmParams(E, N, K, "silu", True, gather_top_k=k, out_dtype=dtype, tile=GemmTile(16, 16, 16))
    out = torch.full((T * k, N), NAN, dtype=dtype)
    with launch.recording() as rec:
        grouped_gemm(x, w, params, out=out, offsets=offsets, order=order, w_up=w_up)
    assert rec[0].constexprs["GLU_INTERLEAVED"] == (layout != "apart")
    rows = order.long() // k
    experts = ids.reshape(-1)[order.long()].long()
    xf, wf, uf = x.float()[rows], w.float()[experts], w_up.float()[experts]
    want = reference.activation("silu", torch.einsum("rk,rnk->rn", xf, wf)) * torch.einsum("rk,rnk->rn", xf, uf)
    check_close(out, want.to(dtype), dtype)


def test_argument_checks():
    a, w = torch.randn(4, 8), torch.randn(2, 16, 8)
    order, offsets = dispatch(torch.zeros(4, 1, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="glu needs an activation"):
        GroupedGemmParams(2, 16, 8, glu=True)
    with pytest.raises(ValueError, match="power of two"):
        GroupedGemmParams(2, 16, 8, tile=GemmTile(8, 16, 16))
    with pytest.raises(ValueError, match="group_m"):
        GroupedGemmParams(2, 16, 8, tile=GemmTile(16, 16, 16, group_m=0))
    with pytest.raises(ValueError, match="w must be"):
        grouped_gemm(a, w[:, :8], GroupedGemmParams(2, 16, 8, gather_top_k=1), out=torch.empty(4, 16),
                     offsets=offsets, order=order)
    with pytest.raises(ValueError, match="need offsets"):
        grouped_gemm(a, w, GroupedGemmParams(2, 16, 8, gather_top_k=1), out=torch.empty(4, 16))
    with pytest.raises(ValueError, match="out is"):
        grouped_gemm(a, w, GroupedGemmParams(2, 16, 8, gather_top_k=1), out=torch.empty(4, 16, dtype=torch.float16),
                     offsets=offsets, order=order)


def test_kernel_source_header():
    params = GroupedGemmParams(8, 64, 32, "silu", True, gather_top_k=2, tile=GemmTile(32, 64, 16),
                               header="%h = grouped_gemm[gather, silu*up](%x, %w_gate, %w_up)\n")
    kern = render_grouped_gemm(params)
    lines = kern.source.splitlines()
    assert lines[0] == f"# moec kernel {kern.fn_name}"
    assert lines[1] == "# IR node: %h = grouped_gemm[gather, silu*up](%x, %w_gate, %w_up)"
    assert "BLOCK_M=32 BLOCK_N=64 BLOCK_K=16 GROUP_M=8" in kern.source
    # the kernel and its helpers: tile order, the experts' scan, a tile's rows, a weight tile, one output tile
    assert kern.source.count("@triton.jit") == 6 and f"def {kern.fn_name}(" in kern.source
    assert render_grouped_gemm(params) is kern
    red = render_reduce(ReduceParams(2, 64, header="%y = reduce_topk(%yp)"))
    assert red.source.startswith(f"# moec kernel {red.fn_name}\n# IR node: %y = reduce_topk(%yp)\n")
    assert red.source.count("@triton.jit") == 1


# ----------------------------------------------------------------------------------------------
# dispatch and reduce on their own

def naive_dispatch(ids, E):
    flat = ids.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda p: (flat[p] if flat[p] >= 0 else E, p))
    offsets = [sum(1 for e in flat if 0 <= e < b) for b in range(E + 1)]
    return order, offsets


@settings(max_examples=200, **SETTINGS)
@given(st.integers(1, 9), st.integers(0, 40), st.data())
def test_dispatch_matches_naive_sort(E, T, data):
    k = data.draw(st.integers(1, E))
    vals = data.draw(st.lists(st.integers(-1, E - 1), min_size=T * k, max_size=T * k))
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    ids = torch.tensor(vals, dtype=dtype).reshape(T, k)
    order, offsets = dispatch(ids, E)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int32
    assert order.shape == (T * k,) and offsets.shape == (E + 1,)
    ref_order, ref_offsets = naive_dispatch(ids, E)
    assert order.tolist() == ref_order
    assert offsets.tolist() == ref_offsets


def test_dispatch_empty():
    order, offsets = dispatch(torch.empty(0, 2, dtype=torch.int32), 5)
    assert order.shape == (0,) and offsets.tolist() == [0] * 6


@settings(max_examples=25, **SETTINGS)
@given(st.integers(0, 33), st.integers(1, 4), st.sampled_from([8, 40, 80]), st.booleans(), st.booleans(),
       st.sampled_from([torch.float32, torch.float16]), st.sampled_from(ROW_TILES), st.integers(0, 999))
def test_reduce_topk(T, k, D, with_ids, with_res, out_dtype, tile, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(T * k, 2 * D, generator=g)[:, :D]                          # strided rows
    ids = torch.randint(-1, 3, (T, k), generator=g)
    res = torch.randn(D, T, generator=g).t() if with_res else None            # column-major residual
    keep = (ids >= 0) if with_ids else torch.ones(T, k, dtype=torch.bool)
    y[~keep.reshape(-1)] = NAN                                                # never read
    out = torch.full((T, D), NAN, dtype=out_dtype)
    reduce_topk(y, ReduceParams(k, D, with_res, out_dtype, tile), out=out, ids=ids if with_ids else None,
                residual=res)
    ref = torch.zeros(T, D)
    for s in range(k):                                                        # the same fixed order
        ref = ref + torch.where(keep[:, s, None], y.reshape(T, k, D)[:, s], 0.0)
    if res is not None:
        ref = ref + res
    if out_dtype == torch.float32:
        assert torch.equal(out, ref)                                          # bitwise: same order, fp32
    else:
        torch.testing.assert_close(out, ref.to(out_dtype), rtol=0, atol=0)


def test_layer_is_deterministic():
    spec, w = make_layer(5, 3, 40, 24, glu=True, act="silu", seed=1, capacity=1.0, shared=8)
    x = torch.randn(33, 40)
    ids, weights = routing(x, w, spec)
    y1 = moe_kernels(x, w, spec, ids, weights, tile=GemmTile(16, 32, 32))
    y2 = moe_kernels(x, w, spec, ids, weights, tile=GemmTile(16, 32, 32))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("layout", ["linear", "stacked", "unaligned", "interleaved"])
def test_weight_tiles_by_tma_where_the_layout_allows(layout):
    """With ``tma`` the weights go to the kernel as tensor descriptors (TMA on sm90+; the interpreter runs them)
    when both are 16-byte aligned with a contiguous N or K: the result is bitwise the pointer path's, zero
    filled past N and K. An unaligned row stride or GPT-OSS's interleaved gate/up keep pointer loads."""
    g = torch.Generator().manual_seed(3)
    E, K, N, T, k = 4, 40, 24, 9, 2
    if layout == "stacked":
        w, w_up = (torch.randn(E, K, N, generator=g).half().transpose(1, 2) for _ in range(2))
    elif layout == "unaligned":
        w, w_up = (torch.randn(E, N, K + 3, generator=g).half()[..., :K] for _ in range(2))
    elif layout == "interleaved":
        gate_up = torch.randn(E, 2 * N, K, generator=g).half()
        w, w_up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        w, w_up = (torch.randn(E, N, K, generator=g).half() for _ in range(2))
    x = torch.randn(T, K, generator=g).half()
    order, offsets = dispatch(torch.randint(0, E, (T, k), generator=g, dtype=torch.int32), E)
    outs = []
    for tma in (False, True):
        params = GroupedGemmParams(E, N, K, "silu", True, gather_top_k=k, out_dtype=torch.float16,
                                   tile=GemmTile(16, 16, 16), tma=tma)
        out = torch.full((T * k, N), NAN, dtype=torch.float16)
        with launch.recording() as rec:
            grouped_gemm(x, w, params, out=out, offsets=offsets, order=order, w_up=w_up)
        outs.append(out)
    want = {"linear": 1, "stacked": 2, "unaligned": 0, "interleaved": 0}[layout]
    assert rec[0].constexprs["W_DESC"] == want
    assert rec[0].signature["w_ptr"] == ("tensordesc<fp16[1, 16, 16]>" if want else "*fp16")
    assert torch.equal(outs[0], outs[1]) and not torch.isnan(outs[1]).any()


def test_tma_switch(monkeypatch):
    """``MOEC_TMA``: unset, the device decides (none on the CPU); 1 on (here: the interpreter); 0 off; anything
    else names the variable. fp32 weights never (their staging buffer is not in the tile's shared memory)."""
    w = torch.randn(2, 32, 32).half()
    params = GroupedGemmParams(2, 32, 32, tile=GemmTile(16, 16, 16))
    for value, want in (("", 0), ("1", 1), ("0", 0)):
        monkeypatch.setenv("MOEC_TMA", value)
        assert GroupedGemmLaunch(params, w, None, None, None, True).launcher.constexprs["W_DESC"] == want
    monkeypatch.setenv("MOEC_TMA", "1")
    assert GroupedGemmLaunch(params, w.float(), None, None, None, True).launcher.constexprs["W_DESC"] == 0
    monkeypatch.setenv("MOEC_TMA", "yes")
    with pytest.raises(ValueError, match="MOEC_TMA"):
        GroupedGemmLaunch(params, w, None, None, None, True)
