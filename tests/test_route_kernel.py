"""The fused routing kernel against the eager reference (`moec.reference.route`), under the
Triton interpreter on CPU tensors, plus one ahead-of-time compile for sm80/sm90/sm100."""
from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moec import reference as ref
from moec.runtime import aot, launch
from moec.runtime.dispatch import dispatch
from moec.ir.interp import tile_schedule as reference_schedule
from moec.runtime.route_kernel import RouteOutputs, RouteParams, fused_route, load_balancing_loss, render_route
from moec.ir.tiles import RouteTile
from moec.spec import RouterConfig

# the interpreter evaluates in numpy: exp overflow / NaN arithmetic warnings are expected there
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

EXPERTS = list(range(1, 17)) + [64]
GAP = 1e-5                                     # keys closer than this may legitimately swap
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


# ----------------------------------------------------------------------------------------------
# helpers

def make_weights(cfg: RouterConfig, d: int, dtype, gen: torch.Generator, *, shared_gate=False, scale=1.0):
    E = cfg.num_experts
    w = {"w_router": (torch.randn(E, d, generator=gen) * scale / d ** 0.5).to(dtype)}
    if cfg.router_bias:
        w["b_router"] = torch.randn(E, generator=gen) * 0.5
    if cfg.score_bias:
        w["score_bias"] = torch.randn(E, generator=gen) * 0.1
    if cfg.noisy:
        w["w_noise"] = (torch.randn(E, d, generator=gen) / d ** 0.5).to(dtype)
    if shared_gate:
        w["w_shared_gate"] = (torch.randn(1, d, generator=gen) / d ** 0.5).to(dtype)
    return w


def reference(x, cfg: RouterConfig, w: dict, noise=None):
    """What the kernel must produce, from moec.reference (capacity off)."""
    cfg = cfg.replace(capacity_factor=None)
    logits = ref.router_logits(x, w["w_router"], w.get("b_router"), w.get("w_noise"), noise)
    ids, weights, aux = ref.route(logits, cfg, w.get("score_bias"))
    scores = ref.scores_of(logits, cfg)
    keys = ref.selection_keys(scores, cfg, w.get("score_bias"))
    probs = scores if cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)
    biased = scores + w["score_bias"].float() if w.get("score_bias") is not None else scores
    clean = ref.router_logits(x, w["w_router"], w.get("b_router"))    # the kernel writes logits before noise
    return dict(logits=clean, ids=ids, weights=weights, aux=aux, scores=scores, keys=keys, biased=biased,
                prob_sum=probs.sum(0), counts=torch.bincount(ids.reshape(-1), minlength=cfg.num_experts))


def separated(cfg: RouterConfig, r: dict) -> torch.Tensor:
    """Tokens whose ranking cannot flip under ~1e-6 logit noise: every adjacent gap among the
    reference's top-(k+1) selection keys (and top-(topk_group+1) group scores) exceeds GAP."""
    def gaps_ok(values: torch.Tensor, n: int) -> torch.Tensor:
        v = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
        top = torch.sort(v, dim=-1, descending=True).values[:, :n + 1]
        if top.shape[1] < 2:
            return torch.ones(v.shape[0], dtype=torch.bool)
        a, b = top[:, :-1], top[:, 1:]
        same_inf = torch.isinf(a) & (a == b)             # equal infinities: index order decides
        return ((a - b > GAP) | same_inf).all(-1)

    ok = gaps_ok(r["keys"], cfg.top_k)
    if cfg.n_group > 1:
        T, E = r["biased"].shape
        grouped = r["biased"].view(T, cfg.n_group, E // cfg.n_group)
        if cfg.group_score == "max":
            gs = grouped.max(-1).values
        else:
            gs = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        ok &= gaps_ok(gs, cfg.topk_group)
    return ok


def check(out: RouteOutputs, r: dict, cfg: RouterConfig, params: RouteParams, dtype, *, T: int):
    E, k = cfg.num_experts, cfg.top_k
    tol = TOL[dtype]
    assert out.ids.dtype == torch.int32 and out.ids.shape == (T, k)
    assert out.weights.dtype == torch.float32 and out.weights.shape == (T, k)
    assert out.counts.dtype == torch.int32 and out.counts.shape == (E,)
    ids = out.ids.long()
    assert ((ids >= 0) & (ids < E)).all(), "ids out of range"
    # every token picks k distinct experts
    assert (torch.sort(ids, -1).values.diff(dim=-1) > 0).all()
    # counts are exactly the histogram of the kernel's own ids
    assert torch.equal(out.counts.long(), torch.bincount(ids.reshape(-1), minlength=E))
    ok = separated(cfg, r)
    assert torch.equal(ids[ok], r["ids"][ok]), "ids differ on well-separated tokens"
    torch.testing.assert_close(out.weights[ok], r["weights"][ok], rtol=0, atol=tol, equal_nan=True)
    # where ids may legitimately differ, the weights are still the scores at the chosen ids
    if (~ok).any() and not cfg.renormalize:
        got = r["scores"].gather(1, ids) * cfg.routed_scaling
        torch.testing.assert_close(out.weights[~ok], got[~ok], rtol=0, atol=tol, equal_nan=True)
    if cfg.aux_loss:
        assert out.prob_sum is not None and out.prob_sum.shape == (E,)
        torch.testing.assert_close(out.prob_sum, r["prob_sum"], rtol=1e-5, atol=tol * max(T, 1) ** 0.5,
                                   equal_nan=True)
    else:
        assert out.prob_sum is None
    if params.write_logits:
        torch.testing.assert_close(out.logits, r["logits"], rtol=1e-5, atol=1e-5, equal_nan=True)
    else:
        assert out.logits is None


@st.composite
def router_configs(draw):
    E = draw(st.sampled_from(EXPERTS))
    k = draw(st.integers(1, min(E, 8)))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    n_group, topk_group, group_score = 1, 1, "max"
    divisors = [g for g in range(2, E + 1) if E % g == 0]
    if divisors and draw(st.booleans()):
        n_group = draw(st.sampled_from(divisors))
        per = E // n_group
        lo = -(-k // per)
        if lo <= n_group:
            topk_group = draw(st.integers(lo, n_group))
            group_score = draw(st.sampled_from(["max", "top2_sum"] if per >= 2 else ["max"]))
        else:
            n_group = 1
    return RouterConfig(
        num_experts=E, top_k=k, score=score,
        renormalize=draw(st.booleans()),
        routed_scaling=draw(st.sampled_from([1.0, 2.5])),
        score_bias=draw(st.booleans()), router_bias=draw(st.booleans()),
        n_group=n_group, topk_group=topk_group, group_score=group_score,
        noisy=draw(st.booleans()), aux_loss=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 1.25])),   # ignored by the kernel
    )


# ----------------------------------------------------------------------------------------------
# randomized equivalence with the reference

# at least 60 examples (the conftest's ci profile has 12; HYPOTHESIS_PROFILE=large gives more)
@settings(max_examples=max(60, settings.default.max_examples), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=router_configs(), T=st.integers(0, 40), d=st.sampled_from([16, 32, 48]),
       dtype=st.sampled_from([torch.float32, torch.float16]), shared_gate=st.booleans(),
       write_logits=st.booleans(), layout=st.sampled_from(["contiguous", "strided"]),
       with_noise=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_matches_reference(cfg, T, d, dtype, shared_gate, write_logits, layout, with_noise, seed):
    gen = torch.Generator().manual_seed(seed)
    w = make_weights(cfg, d, dtype, gen, shared_gate=shared_gate, scale=2.0)
    x = torch.randn(T, d, generator=gen).to(dtype)
    if layout == "strided":
        # rows of a wider buffer (row stride 3d, column stride 2); weights as transposed views
        big = torch.zeros(T, 3 * d, dtype=dtype)
        big[:, ::2][:, :d] = x
        x = big[:, ::2][:, :d]
        assert T <= 1 or not x.is_contiguous()
        w["w_router"] = w["w_router"].t().contiguous().t()
        if "w_noise" in w:
            w["w_noise"] = w["w_noise"].t().contiguous().t()
    noise = torch.randn(T, cfg.num_experts, generator=gen) if cfg.noisy and with_noise else None
    params = RouteParams(cfg, d, shared_gate=shared_gate, write_logits=write_logits)
    out = fused_route(x, params=params, noise=noise, **w)
    r = reference(x, cfg, w, noise)
    check(out, r, cfg, params, dtype, T=T)
    if shared_gate:
        want = torch.sigmoid(x.float() @ w["w_shared_gate"].float().t())[:, 0]
        torch.testing.assert_close(out.shared_scale, want, rtol=0, atol=1e-5)
    else:
        assert out.shared_scale is None


# ----------------------------------------------------------------------------------------------
# every variant once, deterministically (fast, readable failures)

VARIANTS = {
    "softmax": RouterConfig(8, 2),
    "softmax_renorm_scaled": RouterConfig(8, 2, renormalize=True, routed_scaling=2.5),
    "sigmoid": RouterConfig(16, 4, score="sigmoid"),
    "sigmoid_renorm_bias": RouterConfig(16, 4, score="sigmoid", renormalize=True, score_bias=True),
    "router_bias": RouterConfig(6, 3, router_bias=True),
    "group_max": RouterConfig(16, 4, score="sigmoid", n_group=4, topk_group=2, score_bias=True),
    "group_top2": RouterConfig(64, 8, score="sigmoid", n_group=8, topk_group=4, group_score="top2_sum",
                               score_bias=True, renormalize=True, routed_scaling=2.5),
    "group_softmax": RouterConfig(12, 2, n_group=3, topk_group=1),
    "noisy": RouterConfig(8, 2, noisy=True),
    "aux_softmax": RouterConfig(8, 2, aux_loss=True),
    "aux_sigmoid": RouterConfig(16, 2, score="sigmoid", aux_loss=True),
    "one_expert": RouterConfig(1, 1),
    "k_equals_e": RouterConfig(5, 5, renormalize=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_variant(name, dtype):
    cfg = VARIANTS[name]
    T, d = 37, 48
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    w = make_weights(cfg, d, dtype, gen, shared_gate=True, scale=2.0)
    x = torch.randn(T, d, generator=gen).to(dtype)
    noise = torch.randn(T, cfg.num_experts, generator=gen) if cfg.noisy else None
    params = RouteParams(cfg, d, shared_gate=True, write_logits=True)
    out = fused_route(x, params=params, noise=noise, **w)
    r = reference(x, cfg, w, noise)
    assert separated(cfg, r).float().mean() > 0.8
    check(out, r, cfg, params, dtype, T=T)
    if cfg.aux_loss:
        torch.testing.assert_close(load_balancing_loss(out, cfg.num_experts, T), r["aux"], rtol=1e-5, atol=1e-6)


def test_noisy_eval_adds_no_noise():
    cfg = RouterConfig(8, 2, noisy=True)
    gen = torch.Generator().manual_seed(1)
    w = make_weights(cfg, 32, torch.float32, gen)
    x = torch.randn(20, 32, generator=gen)
    params = RouteParams(cfg, 32, write_logits=True)
    out = fused_route(x, w["w_router"], params, w_noise=w["w_noise"], noise=None)
    torch.testing.assert_close(out.logits, x @ w["w_router"].t(), rtol=1e-5, atol=1e-5)
    r = reference(x, cfg, {"w_router": w["w_router"]})
    check(out, r, cfg, params, torch.float32, T=20)


# ----------------------------------------------------------------------------------------------
# edges

def test_empty_batch_launches_nothing():
    cfg = RouterConfig(8, 2, aux_loss=True)
    params = RouteParams(cfg, 16, shared_gate=True, write_logits=True)
    with launch.recording() as records:
        out = fused_route(torch.randn(0, 16), torch.randn(8, 16), params, w_shared_gate=torch.randn(1, 16))
    assert records == []
    assert out.ids.shape == (0, 2) and out.ids.dtype == torch.int32
    assert out.weights.shape == (0, 2)
    assert torch.equal(out.counts, torch.zeros(8, dtype=torch.int32))
    assert torch.equal(out.prob_sum, torch.zeros(8))
    assert out.shared_scale.shape == (0,) and out.logits.shape == (0, 8)


def test_single_token():
    cfg = RouterConfig(16, 4, score="sigmoid", renormalize=True)
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 32, generator=gen), torch.randn(16, 32, generator=gen)
    out = fused_route(x, w, RouteParams(cfg, 32))
    ids, weights, _ = ref.route(ref.router_logits(x, w), cfg)
    assert torch.equal(out.ids.long(), ids)
    torch.testing.assert_close(out.weights, weights, rtol=0, atol=1e-5)
    assert out.counts.sum() == 4


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_all_tokens_to_one_expert(score):
    cfg = RouterConfig(8, 2, score=score)
    gen = torch.Generator().manual_seed(4)
    T, d = 40, 16
    x = torch.rand(T, d, generator=gen) + 0.5            # positive: row 5's huge weights win
    w = torch.randn(8, d, generator=gen) * 0.01
    w[5] = 100.0
    out = fused_route(x, w, RouteParams(cfg, d))
    assert (out.ids[:, 0] == 5).all()
    assert out.counts[5] == T and out.counts.sum() == 2 * T
    r = reference(x, cfg, {"w_router": w})
    check(out, r, cfg, RouteParams(cfg, d), torch.float32, T=T)


@pytest.mark.parametrize("cfg", [
    RouterConfig(8, 3),
    RouterConfig(8, 3, score="sigmoid", renormalize=True),
    RouterConfig(16, 5, score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum"),
    RouterConfig(64, 8, n_group=8, topk_group=3),
], ids=["softmax", "sigmoid", "group_top2", "group_max_64"])
def test_exact_ties_go_to_lower_index(cfg):
    T, d = 20, 32
    x = torch.randn(T, d)
    out = fused_route(x, torch.zeros(cfg.num_experts, d), RouteParams(cfg, d))
    want = torch.arange(cfg.top_k, dtype=torch.int32).expand(T, -1)
    assert torch.equal(out.ids, want)
    ids, weights, _ = ref.route(torch.zeros(T, cfg.num_experts), cfg)
    assert torch.equal(ids, want.long())
    torch.testing.assert_close(out.weights, weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    RouterConfig(8, 2, aux_loss=True),
    RouterConfig(16, 4, score="sigmoid", renormalize=True, score_bias=True),
    RouterConfig(16, 4, score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum"),
], ids=["softmax", "sigmoid_bias", "grouped"])
def test_nan_token(cfg):
    T, d = 24, 32
    gen = torch.Generator().manual_seed(5)
    w = make_weights(cfg, d, torch.float32, gen, scale=2.0)
    x = torch.randn(T, d, generator=gen)
    x[7, 3] = float("nan")
    out = fused_route(x, params=RouteParams(cfg, d), **w)
    assert ((out.ids >= 0) & (out.ids < cfg.num_experts)).all()
    assert torch.isnan(out.weights[7]).all()
    assert not torch.isnan(out.weights[torch.arange(T) != 7]).any()
    r = reference(x, cfg, w)
    assert torch.equal(out.ids[7].long(), r["ids"][7])        # NaN ranks first: experts 0..k-1
    check(out, r, cfg, RouteParams(cfg, d), torch.float32, T=T)
    if cfg.aux_loss:
        assert torch.isnan(out.prob_sum).all()


def test_strided_rows_and_transposed_weight():
    cfg = RouterConfig(12, 3, router_bias=True, renormalize=True)
    gen = torch.Generator().manual_seed(6)
    T, d = 33, 48
    big = torch.randn(T, 2 * d + 5, generator=gen)
    x = big[:, 5:5 + d]                                  # row stride 2d + 5
    wt = torch.randn(d, 12, generator=gen)               # an [in, out] parameter
    w = wt.t()                                           # [E, d] view, stride (1, E)
    b = torch.randn(12, generator=gen)
    out = fused_route(x, w, RouteParams(cfg, d, write_logits=True), b_router=b)
    r = reference(x, cfg, {"w_router": w, "b_router": b})
    check(out, r, cfg, RouteParams(cfg, d, write_logits=True), torch.float32, T=T)


def test_counts_accumulate_across_programs():
    cfg = RouterConfig(4, 2)
    T, d = 40, 16                                        # 3 programs of 16 tokens
    out = fused_route(torch.randn(T, d), torch.randn(4, d), RouteParams(cfg, d, tile=RouteTile(16, 16)))
    assert out.counts.sum() == 2 * T


# ----------------------------------------------------------------------------------------------
# dispatch in the routing kernel (fuse-dispatch): the pairs grouped by expert, as `dispatch` sorts them

def _check_dispatch(out: RouteOutputs, E: int, block_m: int = 0) -> None:
    """The kernel's order and offsets are exactly `moec.runtime.dispatch.dispatch` of its own ids; with
    ``block_m`` its tile schedule is the reference interpreter's (`moec.ir.interp.tile_schedule`) up to the
    tile count."""
    order, offsets = dispatch(out.ids, E)
    assert out.order.dtype == torch.int32 and out.offsets.dtype == torch.int32
    assert torch.equal(out.offsets, offsets), (out.offsets, offsets)
    assert torch.equal(out.order, order), (out.order, order)
    if not block_m:
        assert out.schedule is None
        return
    M = order.shape[0]
    want = reference_schedule(offsets, M, block_m)
    n = want[0].item()
    assert out.schedule.dtype == torch.int32 and out.schedule.shape == (3 * M + 1,) and out.schedule[0].item() == n
    for part in range(3):
        assert torch.equal(out.schedule[1 + part * M:1 + part * M + n], want[1 + part * M:1 + part * M + n])


@settings(max_examples=max(40, settings.default.max_examples), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=router_configs(), T=st.integers(0, 40), block_t=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2 ** 31 - 1),
       block_m=st.sampled_from([0, 16, 32, 64]), bucket_m=st.sampled_from([0, 16]))
def test_dispatch_matches_the_sort(cfg, T, block_t, dtype, seed, block_m, bucket_m):
    """Up to BLOCK_T tokens the kernel's counting sort, above it the device sort after the kernel: both
    give dispatch's stable order (token order within an expert) and offsets, counts as before; with a
    schedule, the tile schedule of the bucket's BLOCK_M (``bucket_m``: another for T <= 16)."""
    d = 32
    gen = torch.Generator().manual_seed(seed)
    w = make_weights(cfg, d, dtype, gen, scale=2.0)
    w.pop("w_noise", None)
    cfg = cfg.replace(noisy=False)
    x = torch.randn(T, d, generator=gen).to(dtype)
    params = RouteParams(cfg, d, tile=RouteTile(block_t, 32))
    schedule = ({16: bucket_m, None: block_m} if bucket_m else {None: block_m}) if block_m else None
    out = fused_route(x, params=params, dispatch=True, schedule=schedule, **w)
    _check_dispatch(out, cfg.num_experts, (bucket_m if bucket_m and T <= 16 else block_m) if block_m else 0)
    assert torch.equal(out.counts.long(), torch.bincount(out.ids.reshape(-1).long(), minlength=cfg.num_experts))
    plain = fused_route(x, params=params, **w)
    assert plain.order is None and torch.equal(plain.ids, out.ids) and torch.equal(plain.weights, out.weights)


@pytest.mark.parametrize("E,k,T", [(16, 4, 16), (16, 4, 17), (64, 8, 1), (5, 5, 16), (1, 1, 3), (12, 2, 0)],
                         ids=["E_pad_is_E", "two_programs", "one_token", "k_equals_e", "one_expert", "empty"])
def test_dispatch_edges(E, k, T):
    """E a power of two (no padded column holds offsets[E]), T at and past BLOCK_T, k = E, one expert, no tokens."""
    cfg = RouterConfig(E, k, renormalize=True)
    d = 16
    gen = torch.Generator().manual_seed(E * 100 + T)
    w = make_weights(cfg, d, torch.float32, gen)
    x = torch.randn(T, d, generator=gen)
    out = fused_route(x, params=RouteParams(cfg, d, tile=RouteTile(16, 16)), dispatch=True, schedule={None: 16}, **w)
    assert out.order.shape == (T * k,) and out.offsets.shape == (E + 1,)
    _check_dispatch(out, E, 16)


def test_dispatch_of_nan_rows_and_ties():
    """A NaN row (experts 0..k-1) and all-equal logits (ties to the lower index) sort like any other."""
    cfg = RouterConfig(8, 3)
    d = 16
    x = torch.randn(12, d)
    x[4, 2] = float("nan")
    x[7] = 0.0                                         # all logits 0: experts 0, 1, 2
    out = fused_route(x, torch.randn(8, d), RouteParams(cfg, d), dispatch=True)
    assert out.ids[4].tolist() == [0, 1, 2] and out.ids[7].tolist() == [0, 1, 2]
    _check_dispatch(out, 8)


# ----------------------------------------------------------------------------------------------
# API contracts

def test_rejects_topk_then_score():
    with pytest.raises(ValueError, match="score_then_topk"):
        RouteParams(RouterConfig(8, 2, order="topk_then_score"), 16)


def test_rejects_bad_tile_and_missing_tensors():
    with pytest.raises(ValueError):
        RouteParams(RouterConfig(8, 2), 16, tile=RouteTile(8, 64))
    params = RouteParams(RouterConfig(8, 2, router_bias=True), 16)
    with pytest.raises(ValueError, match="b_router"):
        fused_route(torch.randn(4, 16), torch.randn(8, 16), params)
    with pytest.raises(ValueError, match="x must be"):
        fused_route(torch.randn(4, 17), torch.randn(8, 16), params, b_router=torch.randn(8))


def test_render_header_and_cache():
    params = RouteParams(RouterConfig(64, 8, score="sigmoid", n_group=8, topk_group=4), 32,
                         header="%3 = route(%x, %w_router) {E=64, k=8}")
    kern = render_route(params)
    assert render_route(params) is kern
    lines = kern.source.splitlines()
    assert lines[0] == f"# moec kernel {params.fn_name}"
    assert lines[1] == "# IR node: %3 = route(%x, %w_router) {E=64, k=8}"
    assert kern.source.count("@triton.jit") == 1
    assert 'input_precision="ieee"' in kern.source


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation for real GPUs

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_aot_compiles_for_gpus(dtype):
    """Every optional branch on (groups, noise, biases, aux, shared gate, logits), compiled for
    each arch: fp32 operands take the exact input_precision="ieee" dot, fp16 the tensor cores."""
    cfg = RouterConfig(16, 2, score="sigmoid", renormalize=True, routed_scaling=2.5, score_bias=True,
                       router_bias=True, n_group=4, topk_group=2, group_score="top2_sum", noisy=True,
                       aux_loss=True)
    T, d = 40, 48
    gen = torch.Generator().manual_seed(7)
    w = make_weights(cfg, d, dtype, gen, shared_gate=True)
    x = torch.randn(T, d, generator=gen).to(dtype)
    noise = torch.randn(T, 16, generator=gen)
    with launch.recording() as records:
        fused_route(x, params=RouteParams(cfg, d, shared_gate=True, write_logits=True), noise=noise, **w)
    with launch.recording() as sorting:           # one program: the counting sort by expert in the kernel
        fused_route(x[:16], params=RouteParams(cfg, d, shared_gate=True), noise=noise[:16], dispatch=True,
                    schedule={None: 16}, **w)
    assert sorting[0].constexprs["DISPATCH"] and sorting[0].constexprs["SCHED_M"] == 16 and sorting[0].grid == (1,)
    records += sorting
    assert len(records) == 2 and records[0].grid == (3,)
    assert records[0].signature["x_ptr"] == ("*fp32" if dtype == torch.float32 else "*fp16")
    for arch in ("sm80", "sm90", "sm100"):
        for rec in records:
            report = aot.compile_launch(rec, arch)
            assert report.fits, (arch, report.shared, report.smem_limit)
            assert report.spills == 0, (arch, rec.constexprs["DISPATCH"], report.spills)
            if dtype == torch.float16:
                assert report.mma, f"{arch}: no tensor-core instruction in the PTX"
