"""The whole compiled pipeline against the eager reference.

``moec.compiler.compile_spec(spec, dtype, outputs, arch)`` (IR -> passes -> lowered `Program` of
generated Triton kernels, run by the Triton interpreter on CPU tensors) must compute what
``moec.reference.moe`` computes (``y`` and the load-balancing loss) and what
``moec.reference.router_logits`` computes (the ``logits`` output), for every router variant,
expert shape, token count, dtype (fp32, fp16; bf16 is not run on a CPU) and tile table
(``cpu``, plus ``sm80``/``sm90`` tiles, still interpreted).

Routing is a discrete choice: a token whose top-(k+1) selection keys (or group scores) lie
within `GAP` of each other may legitimately pick different experts in the kernel and in the
reference. Randomized tests drop such tokens from the batch before running either (see
`separated`); deterministic tests pin exact ties, whose rule (lower expert index wins) the
reference defines.

Property tests take their example count from the hypothesis profile (tests/conftest.py):
``HYPOTHESIS_PROFILE=large`` scales them.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moec import reference as ref
from moec import compiler
from moec.compiler import compile_spec
from moec.ir.build import moe_inputs
from moec.runtime import cache, launch
from moec.runtime.arch import ARCHS
from moec.spec import MoESpecError, ACTIVATIONS, MoESpec, MoEWeights, RouterConfig, SharedExpertConfig

# the interpreter evaluates in numpy: exp overflow / NaN arithmetic warnings are expected there
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CPU = ARCHS["cpu"]
GAP = 1e-4                                   # selection keys closer than this may legitimately swap
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
LOGITS_TOL = {torch.float32: 1e-4, torch.float16: 1e-3}   # logits are fp32 dots of the inputs
AUX_TOL = 1e-4
HIDDEN = (16, 24, 32, 48)                    # 24: not a multiple of the 16-wide tl.dot tiles
OUTPUTS = (("y",), ("y", "logits"), ("y", "aux"), ("y", "weights"))
DTYPES = (torch.float32, torch.float16)


# ----------------------------------------------------------------------------------------------
# helpers

def make_weights(spec: MoESpec, dtype, gen: torch.Generator, *, router_scale: float = 1.0) -> MoEWeights:
    """Random layer weights in ``dtype`` (score_bias stays fp32, as `moe_inputs` passes it)."""
    E, d, f, r = spec.num_experts, spec.hidden, spec.ffn, spec.router
    Ef = spec.ffn_experts                   # identity experts have no weights

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    w = MoEWeights(
        w_router=rnd(E, d, scale=router_scale / math.sqrt(d)),
        w_up=rnd(Ef, f, d, scale=1 / math.sqrt(d)),
        w_down=rnd(Ef, d, f, scale=1 / math.sqrt(f)),
        w_gate=rnd(Ef, f, d, scale=1 / math.sqrt(d)) if spec.glu else None,
        b_router=rnd(E, scale=0.5) if r.router_bias else None,
        score_bias=torch.randn(E, generator=gen) * 0.1 if r.score_bias else None,
        w_noise=rnd(E, d, scale=1 / math.sqrt(d)) if r.noisy else None,
    )
    if spec.expert_bias:
        w.b_gate = rnd(Ef, f, scale=0.5) if spec.glu else None
        w.b_up = rnd(Ef, f, scale=0.5)
        w.b_down = rnd(Ef, d, scale=0.5)
    if spec.shared is not None:
        fs = spec.shared.width
        w.shared_up = rnd(fs, d, scale=1 / math.sqrt(d))
        w.shared_down = rnd(d, fs, scale=1 / math.sqrt(fs))
        w.shared_gate = rnd(fs, d, scale=1 / math.sqrt(d)) if spec.glu else None
        w.shared_gate_proj = rnd(1, d, scale=1 / math.sqrt(d)) if spec.shared.gated else None
    return w


def transposed_views(w: MoEWeights) -> MoEWeights:
    """The same weights as non-contiguous views (a ``[E, in, out]`` parameter passed as
    ``.transpose(1, 2)``, the router as the transpose of a ``[d, E]`` buffer): kernels read strides."""
    def view(t):
        if t is None:
            return None
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return MoEWeights(w_router=view(w.w_router), w_up=view(w.w_up), w_down=view(w.w_down), w_gate=view(w.w_gate),
                      b_router=w.b_router, score_bias=w.score_bias, w_noise=view(w.w_noise),
                      shared_up=view(w.shared_up), shared_down=view(w.shared_down),
                      shared_gate=view(w.shared_gate), shared_gate_proj=w.shared_gate_proj,
                      b_gate=_strided(w.b_gate), b_up=_strided(w.b_up), b_down=_strided(w.b_down))


def _strided(b):
    """A bias ``[E, n]`` as every other column of a ``[E, 2n]`` buffer (GPT-OSS's interleaved layout)."""
    if b is None:
        return None
    wide = torch.zeros(b.shape[0], 2 * b.shape[1], dtype=b.dtype)
    wide[:, 1::2] = b
    return wide[:, 1::2]


def run_compiled(spec, dtype, outputs, arch, x, w, *, training=False, noise=None, group_size=None):
    compiled = compile_spec(spec, dtype, tuple(outputs), arch)
    return compiled.program.run(moe_inputs(x, w), training=training, noise=noise, group_size=group_size)


def reference_outputs(spec, outputs, x, w, noise=None, group_size=None):
    """What the program must return; ``noise`` only when it applies (noisy router, training).
    The ``logits`` output is the router's linear (``x @ w_router.T + b``), as in the IR graph."""
    y, aux = ref.moe(x, w, spec, noise=noise, group_size=group_size)
    values = {"y": y, "aux": aux, "logits": ref.router_logits(x, w.w_router, w.b_router),
              "weights": ref.route(ref.router_logits(x, w.w_router, w.b_router, w.w_noise, noise), spec.router,
                                   w.score_bias, group_size)[1]}
    return [values[o] for o in outputs]


def _gaps_ok(values: torch.Tensor, n: int) -> torch.Tensor:
    """Rows whose n+1 largest values (NaN ranked first) are pairwise more than GAP apart."""
    v = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
    top = torch.sort(v, dim=-1, descending=True).values[:, :n + 1]
    if top.shape[1] < 2:
        return torch.ones(v.shape[0], dtype=torch.bool)
    a, b = top[:, :-1], top[:, 1:]
    same_inf = torch.isinf(a) & (a == b)             # equal infinities: the index order decides
    return ((a - b > GAP) | same_inf).all(-1)


def separated(spec: MoESpec, x, w: MoEWeights, noise=None) -> torch.Tensor:
    """Tokens whose expert choice cannot flip under rounding: the reference's selection keys
    (and group scores) are more than GAP apart over every rank that routing looks at (the top
    k+1, or every rank when capacity overflow moves pairs to the next-best expert)."""
    cfg = spec.router
    logits = ref.router_logits(x, w.w_router, w.b_router, w.w_noise, noise)
    scores = ref.scores_of(logits, cfg)
    E = cfg.num_experts
    depth = E if (cfg.has_capacity and cfg.overflow == "next_best") else cfg.top_k
    if cfg.order == "topk_then_score":
        # the reference ranks logits; the compiled (canonical) router ranks softmax scores
        return _gaps_ok(logits, depth) & _gaps_ok(scores, depth)
    ok = _gaps_ok(ref.selection_keys(scores, cfg, w.score_bias), depth)
    if cfg.n_group > 1:
        biased = scores + w.score_bias.float() if w.score_bias is not None else scores
        grouped = biased.view(-1, cfg.n_group, E // cfg.n_group)
        if cfg.group_score == "max":
            gs = grouped.max(-1).values
        else:
            gs = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        ok &= _gaps_ok(gs, cfg.topk_group)
    return ok


def assert_matches(got, want, outputs, dtype, T, d, E):
    """Every output: shape, dtype, and values within the dtype's tolerance, relative to the
    reference output's largest magnitude (aux: relative to its value)."""
    assert len(got) == len(outputs)
    for name, g, r in zip(outputs, got, want):
        if name == "y":
            assert g.dtype == dtype and tuple(g.shape) == (T, d), (g.dtype, tuple(g.shape))
            tol = TOL[dtype]
        elif name == "logits":
            assert g.is_floating_point() and tuple(g.shape) == (T, E), (g.dtype, tuple(g.shape))
            tol = LOGITS_TOL[dtype]
        elif name == "weights":
            assert g.dtype == torch.float32 and g.shape[0] == T, (g.dtype, tuple(g.shape))
            tol = LOGITS_TOL[dtype]
        else:
            assert g.dtype == torch.float32 and g.dim() == 0, (g.dtype, tuple(g.shape))
            torch.testing.assert_close(g, r.float(), rtol=AUX_TOL, atol=AUX_TOL, msg=lambda m: f"aux: {m}")
            continue
        if r.numel() == 0:
            continue
        scale = max(r.float().abs().max().item(), 1e-3)
        torch.testing.assert_close(g.float(), r.float(), rtol=tol, atol=tol * scale, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_case(spec: MoESpec, dtype, outputs, arch, T: int, seed: int, *, training=False,
               router_scale=1.0, filter_ties=True, views=False):
    """Draw weights and x (and noise), drop near-tie tokens, compare compiled with reference.
    An ``aux`` output needs a router with ``aux_loss`` (turned on here if it is off)."""
    if "aux" in outputs and not spec.router.aux_loss:
        spec = dataclasses.replace(spec, router=spec.router.replace(aux_loss=True))
    gen = torch.Generator().manual_seed(seed)
    w = make_weights(spec, dtype, gen, router_scale=router_scale)
    if views:
        w = transposed_views(w)
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    noise = torch.randn(T, spec.num_experts, generator=gen).to(dtype) if spec.router.noisy else None
    active = noise if (training and noise is not None) else None
    if filter_ties:
        keep = separated(spec, x, w, active)
        x = x[keep]
        noise = noise[keep] if noise is not None else None
        active = active[keep] if active is not None else None
    group = sequence_length(spec, x.shape[0], seed)
    # a noise tensor given in eval mode must be ignored
    got = run_compiled(spec, dtype, outputs, arch, x, w, training=training, noise=noise, group_size=group)
    want = reference_outputs(spec, outputs, x, w, active, group)
    assert_matches(got, want, outputs, dtype, x.shape[0], spec.hidden, spec.num_experts)
    return x.shape[0]


def sequence_length(spec: MoESpec, T: int, seed: int):
    """For a per-sequence capacity, a length that tiles T (one of its divisors, by the seed); else None."""
    if spec.router.capacity_per != "sequence" or T == 0:
        return None
    divisors = [s for s in range(1, T + 1) if T % s == 0]
    return divisors[seed % len(divisors)]


# ----------------------------------------------------------------------------------------------
# strategies

@st.composite
def routers(draw, *, capacity=None, noisy=False, big=True):
    """A valid RouterConfig. ``capacity``: None draws it, True/False forces it on/off."""
    E = draw(st.integers(1, 16))
    if big and draw(st.integers(0, 9)) == 9:          # now and then a wide layer
        E = 64
    k = draw(st.integers(1, min(E, 4)))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    order = "topk_then_score" if score == "softmax" and draw(st.booleans()) else "score_then_topk"
    n_group, topk_group, group_score, score_bias = 1, 1, "max", False
    if order == "score_then_topk":
        # (topk_then_score ranks raw logits: score_bias and groups are not part of that form)
        score_bias = draw(st.booleans())
        divisors = [g for g in range(2, E + 1) if E % g == 0]
        if divisors and draw(st.booleans()):
            n_group = draw(st.sampled_from(divisors))
            per = E // n_group
            topk_group = draw(st.integers(-(-k // per), n_group))
            group_score = draw(st.sampled_from(["max", "top2_sum"] if per >= 2 else ["max"]))
    cap = {}
    if capacity or (capacity is None and draw(st.booleans())):
        overflow = draw(st.sampled_from(["drop", "next_best"]))
        cap = {"overflow": overflow, "capacity_per": draw(st.sampled_from(["batch", "sequence"])),
               "dropped": draw(st.sampled_from(["zero", "pass"])) if overflow == "drop" else "zero"}
        if draw(st.integers(0, 3)) == 0:              # Switch's fixed capacity per expert
            cap["expert_capacity"] = draw(st.integers(1, 6))
        else:
            cap["capacity_factor"] = draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]))
            cap["capacity_round"] = draw(st.sampled_from(["ceil", "floor"]))
            cap["min_capacity"] = draw(st.sampled_from([1, 1, 4] if cap["capacity_round"] == "ceil" else [0, 1, 4]))
    renormalize = order == "score_then_topk" and draw(st.booleans())
    aux = draw(st.booleans())
    if cap and renormalize and cap["dropped"] == "zero" and draw(st.booleans()):
        cap["renormalize_kept"] = True                # fairseq / DeepSpeed: normalised over the kept pairs
    return RouterConfig(
        num_experts=E, top_k=k, score=score, order=order,
        renormalize=renormalize,
        routed_scaling=draw(st.sampled_from([1.0, 2.5, 0.5])),
        score_bias=score_bias, router_bias=draw(st.booleans()),
        n_group=n_group, topk_group=topk_group, group_score=group_score,
        noisy=noisy, aux_loss=aux, aux_counts=draw(st.sampled_from(["pairs", "first"])) if aux else "pairs", **cap,
    )


@st.composite
def specs(draw, router):
    r = draw(router)
    shared = None
    if draw(st.booleans()):
        shared = SharedExpertConfig(width=draw(st.integers(8, 48)), gated=draw(st.booleans()))
    activation, glu = draw(st.sampled_from(ACTIVATIONS)), draw(st.booleans())
    variant = {}
    if glu and draw(st.integers(0, 3)) == 0:          # now and then GPT-OSS's clamped SwiGLU, or a part of it
        variant = {"glu_limit": draw(st.sampled_from([None, 0.5, 7.0])), "up_shift": draw(st.sampled_from([0.0, 1.0]))}
        if activation == "silu":
            variant["act_alpha"] = draw(st.sampled_from([1.0, 1.702]))
    if glu and draw(st.integers(0, 3)) == 0:          # now and then Inkling2's softcapped SwiGLU, or a part of it
        variant["up_softcap"] = draw(st.sampled_from([None, 0.5, 3.0]))
        if activation == "silu":
            variant["gate_softcap"] = draw(st.sampled_from([None, 0.4, 3.0]))
    if shared is not None and glu and draw(st.integers(0, 2)) == 0:    # now and then a shared expert's own GLU
        own = draw(st.sampled_from([(), (("glu_limit", 0.5),), (("up_shift", 1.0), ("up_softcap", 0.5))]))
        shared = SharedExpertConfig(shared.width, shared.gated, variant=own)
    identity = 0
    if r.num_experts > 1 and not r.has_capacity and draw(st.integers(0, 3)) == 0:
        identity = draw(st.integers(1, r.num_experts - 1))         # now and then LongCat's identity experts
    bias = draw(st.booleans())
    # now and then Llama4's experts, whose input the routing weight scales (bias-free, no identity experts)
    scaled = not bias and not identity and r.dropped != "pass" and draw(st.integers(0, 3)) == 0
    return MoESpec(hidden=draw(st.sampled_from(HIDDEN)), ffn=draw(st.integers(8, 80)), router=r,
                   activation=activation, glu=glu, shared=shared, expert_bias=bias,
                   identity_experts=identity, input_scaled=scaled, **variant)


@st.composite
def token_counts(draw):
    """T = 0 and T = 1 about one time in twelve each, else 2..40."""
    pick = draw(st.integers(0, 11))
    return pick if pick < 2 else draw(st.integers(2, 40))


TOKENS = token_counts()
SEEDS = st.integers(0, 2 ** 31 - 1)
ROUTER_SCALES = st.sampled_from([1.0, 3.0])


# ----------------------------------------------------------------------------------------------
# randomized equivalence with the reference (example counts come from the hypothesis profile)

@settings(deadline=None)
@given(spec=specs(routers(capacity=False)), outputs=st.sampled_from(OUTPUTS), T=TOKENS, seed=SEEDS,
       router_scale=ROUTER_SCALES, views=st.booleans())
def test_fp32_matches_reference(spec, outputs, T, seed, router_scale, views):
    check_case(spec, torch.float32, outputs, CPU, T, seed, router_scale=router_scale, views=views)


@settings(deadline=None)
@given(spec=specs(routers(capacity=False)), outputs=st.sampled_from(OUTPUTS), T=TOKENS, seed=SEEDS,
       router_scale=ROUTER_SCALES, views=st.booleans())
def test_fp16_matches_reference(spec, outputs, T, seed, router_scale, views):
    check_case(spec, torch.float16, outputs, CPU, T, seed, router_scale=router_scale, views=views)


@settings(deadline=None)
@given(spec=specs(routers(capacity=True, big=False)), dtype=st.sampled_from(DTYPES),
       outputs=st.sampled_from(OUTPUTS), T=TOKENS, seed=SEEDS, router_scale=ROUTER_SCALES)
def test_capacity_matches_reference(spec, dtype, outputs, T, seed, router_scale):
    """Capacity with overflow drop / next_best (a torch step between the kernels)."""
    check_case(spec, dtype, outputs, CPU, T, seed, router_scale=router_scale)


@settings(deadline=None)
@given(spec=specs(routers(noisy=True, big=False)), dtype=st.sampled_from(DTYPES),
       outputs=st.sampled_from(OUTPUTS), training=st.booleans(), T=TOKENS, seed=SEEDS)
def test_noisy_gating_matches_reference(spec, dtype, outputs, training, T, seed):
    """Training: logits += noise * softplus(x @ w_noise.T) with the given noise; eval: the
    given noise is ignored."""
    check_case(spec, dtype, outputs, CPU, T, seed, training=training)


@settings(deadline=None)
@given(spec=specs(routers(big=False)), arch=st.sampled_from(["sm80", "sm90"]), dtype=st.sampled_from(DTYPES),
       outputs=st.sampled_from(OUTPUTS), T=TOKENS, seed=SEEDS)
def test_gpu_tiles_match_reference(spec, arch, dtype, outputs, T, seed):
    """The sm80/sm90 tile tables (64-row, 128-wide tiles), still run by the interpreter."""
    check_case(spec, dtype, outputs, ARCHS[arch], T, seed)


# ----------------------------------------------------------------------------------------------
# every variant once, deterministically (readable failures)

NAMED = {
    "mixtral": MoESpec(32, 48, RouterConfig(8, 2, order="topk_then_score")),
    "deepseek_v3": MoESpec(32, 16, RouterConfig(16, 4, score="sigmoid", score_bias=True, n_group=4, topk_group=2,
                                                group_score="top2_sum", renormalize=True, routed_scaling=2.5),
                           shared=SharedExpertConfig(32)),
    "group_max_softmax": MoESpec(24, 16, RouterConfig(12, 3, n_group=3, topk_group=2)),
    "qwen_aux_gated_shared": MoESpec(32, 24, RouterConfig(8, 2, aux_loss=True), shared=SharedExpertConfig(24, gated=True)),
    "sigmoid_aux": MoESpec(16, 16, RouterConfig(8, 2, score="sigmoid", aux_loss=True)),
    "router_bias_scaled": MoESpec(16, 40, RouterConfig(6, 3, router_bias=True, routed_scaling=0.5)),
    "switch_drop": MoESpec(32, 64, RouterConfig(4, 1, capacity_factor=1.0), glu=False, activation="relu"),
    "switch_next_best": MoESpec(32, 64, RouterConfig(4, 2, capacity_factor=0.5, overflow="next_best",
                                                     renormalize=True), glu=False, activation="relu"),
    "switch_per_sequence_pass": MoESpec(32, 64, RouterConfig(4, 1, expert_capacity=2, capacity_per="sequence",
                                                             dropped="pass"), glu=False, activation="relu"),
    "fairseq_top2_kept": MoESpec(24, 16, RouterConfig(8, 2, capacity_factor=0.5, renormalize=True,
                                                      renormalize_kept=True, aux_loss=True, aux_counts="first")),
    "gshard_min_capacity": MoESpec(32, 24, RouterConfig(4, 2, capacity_factor=0.5, min_capacity=3, renormalize=True,
                                                        dropped="pass"), glu=False, activation="relu"),
    "noisy_topk": MoESpec(16, 24, RouterConfig(8, 2, order="topk_then_score", noisy=True, aux_loss=True)),
    "gelu_glu_shared": MoESpec(48, 8, RouterConfig(5, 2), activation="gelu", shared=SharedExpertConfig(16)),
    "gelu_tanh_plain": MoESpec(16, 80, RouterConfig(3, 1), activation="gelu_tanh", glu=False,
                               shared=SharedExpertConfig(8, gated=True)),
    "silu_plain": MoESpec(24, 33, RouterConfig(7, 4, renormalize=True), glu=False),
    "one_expert": MoESpec(16, 16, RouterConfig(1, 1)),
    "k_equals_e": MoESpec(16, 16, RouterConfig(4, 4, renormalize=True)),
    "e64": MoESpec(32, 16, RouterConfig(64, 4, score="sigmoid", score_bias=True, n_group=8, topk_group=3,
                                        renormalize=True, aux_loss=True)),
    "gpt_oss": MoESpec(32, 24, RouterConfig(8, 2, order="topk_then_score", router_bias=True), expert_bias=True,
                       act_alpha=1.702, glu_limit=0.5, up_shift=1.0),
    "bias_plain_gelu": MoESpec(16, 40, RouterConfig(6, 3, renormalize=True), glu=False, activation="gelu",
                               expert_bias=True, shared=SharedExpertConfig(16)),
    "inkling_softcapped": MoESpec(32, 24, RouterConfig(8, 2, score="sigmoid", score_bias=True, renormalize=True,
                                                       routed_scaling=2.5), gate_softcap=0.4, up_softcap=0.5),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_variant(name):
    spec = NAMED[name]
    outputs = ("y", "aux") if spec.router.aux_loss else ("y", "weights") if spec.expert_bias else ("y", "logits")
    for dtype, T, seed in ((torch.float32, 13, 1), (torch.float16, 9, 2)):
        check_case(spec, dtype, outputs, CPU, T, seed, training=spec.router.noisy, router_scale=2.0)


@pytest.mark.parametrize("outputs", OUTPUTS, ids="+".join)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_tokens(outputs, dtype):
    """T = 0 launches nothing and returns empty outputs of the right shapes (aux = 0)."""
    spec = MoESpec(24, 16, RouterConfig(8, 2, aux_loss=True, capacity_factor=1.0),
                   shared=SharedExpertConfig(16, gated=True))
    w = make_weights(spec, dtype, torch.Generator().manual_seed(0))
    x = torch.empty(0, 24, dtype=dtype)
    with launch.recording() as launches:
        got = run_compiled(spec, dtype, outputs, CPU, x, w)
    assert launches == []
    assert got[0].shape == (0, 24) and got[0].dtype == dtype
    if "logits" in outputs:
        assert got[1].shape == (0, 8)
    if "aux" in outputs:
        assert got[1].shape == () and got[1].item() == 0.0
    assert_matches(got, reference_outputs(spec, outputs, x, w), outputs, dtype, 0, 24, 8)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "switch_next_best", "qwen_aux_gated_shared", "e64"])
@pytest.mark.parametrize("arch", ["cpu", "sm90"])
def test_one_token(name, arch):
    spec = NAMED[name]
    outputs = ("y", "aux") if spec.router.aux_loss else ("y", "weights") if spec.expert_bias else ("y", "logits")
    assert check_case(spec, torch.float32, outputs, ARCHS[arch], 1, 5, filter_ties=False) == 1


# ----------------------------------------------------------------------------------------------
# edge cases

def _huge_router_row(w: MoEWeights, x: torch.Tensor, e: int, value: float = 30.0):
    """Make expert ``e`` every token's first choice: x[:, 0] in [1, 2] and w_router[e, 0] = value."""
    gen = torch.Generator().manual_seed(7)
    x[:, 0] = (1 + torch.rand(x.shape[0], generator=gen)).to(x.dtype)
    w.w_router[e, 0] = value


@pytest.mark.parametrize("router", [
    RouterConfig(4, 1),
    RouterConfig(6, 2, score="sigmoid", renormalize=True),
    RouterConfig(4, 1, capacity_factor=1.0),                         # most tokens overflow: dropped
    RouterConfig(4, 2, capacity_factor=1.0, overflow="next_best"),   # ... or moved to their next best
    RouterConfig(4, 1, expert_capacity=3, dropped="pass"),           # ... or passed through
], ids=["softmax_k1", "sigmoid_k2", "capacity_drop", "capacity_next_best", "capacity_pass"])
@pytest.mark.parametrize("arch", ["cpu", "sm80"])
def test_all_tokens_to_one_expert(router, arch):
    spec = MoESpec(32, 24, router, shared=SharedExpertConfig(16))
    gen = torch.Generator().manual_seed(3)
    w = make_weights(spec, torch.float32, gen)
    x = torch.randn(37, 32, generator=gen)
    _huge_router_row(w, x, e=2)
    ids, _, _ = ref.route(ref.router_logits(x, w.w_router), router.without_capacity())
    assert (ids[:, 0] == 2).all()                         # the setup does what it says
    got = run_compiled(spec, torch.float32, ("y", "logits"), ARCHS[arch], x, w)
    assert_matches(got, reference_outputs(spec, ("y", "logits"), x, w), ("y", "logits"), torch.float32, 37, 32,
                   router.num_experts)


@pytest.mark.parametrize("arch", ["cpu", "sm90"])
@pytest.mark.parametrize("T", [2, 5, 40])
def test_experts_without_tokens(arch, T):
    """Half the experts are never chosen (bias -30), and with few tokens most of the rest are
    idle too: their rows in the grouped GEMMs are empty segments."""
    spec = MoESpec(16, 24, RouterConfig(16, 2, router_bias=True, aux_loss=True))
    gen = torch.Generator().manual_seed(T)
    w = make_weights(spec, torch.float32, gen)
    w.b_router[8:] = -30.0
    x = torch.randn(T, 16, generator=gen)
    ids, _, _ = ref.route(ref.router_logits(x, w.w_router, w.b_router), spec.router)
    assert (ids < 8).all() and len(ids.unique()) < 16
    got = run_compiled(spec, torch.float32, ("y", "aux"), ARCHS[arch], x, w)
    assert_matches(got, reference_outputs(spec, ("y", "aux"), x, w), ("y", "aux"), torch.float32, T, 16, 16)


TIES = {
    "softmax": RouterConfig(8, 2),
    "softmax_renorm": RouterConfig(8, 3, renormalize=True),
    "topk_then_score": RouterConfig(8, 2, order="topk_then_score"),
    "sigmoid": RouterConfig(8, 3, score="sigmoid", routed_scaling=2.5),
    "groups_top2": RouterConfig(16, 3, score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum"),
    "groups_max": RouterConfig(12, 2, n_group=3, topk_group=1),
    "capacity_next_best": RouterConfig(4, 1, capacity_factor=1.0, overflow="next_best"),
    "capacity_drop": RouterConfig(4, 2, capacity_factor=0.5),
}


@pytest.mark.parametrize("name", list(TIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_the_lower_expert(name, dtype):
    """An all-zero router: every score ties, so every token picks experts 0..k-1 (the
    reference's rule), and capacity overflow walks the experts in index order."""
    cfg = TIES[name]
    spec = MoESpec(16, 16, cfg)
    gen = torch.Generator().manual_seed(11)
    w = make_weights(spec, dtype, gen)
    w.w_router.zero_()
    x = torch.randn(11, 16, generator=gen).to(dtype)
    ids, _, _ = ref.route(ref.router_logits(x, w.w_router), cfg.replace(capacity_factor=None))
    assert (ids == torch.arange(cfg.top_k)).all()
    outputs = ("y", "logits")
    got = run_compiled(spec, dtype, outputs, CPU, x, w)
    assert_matches(got, reference_outputs(spec, outputs, x, w), outputs, dtype, 11, 16, cfg.num_experts)


@pytest.mark.parametrize("spec", [
    MoESpec(16, 24, RouterConfig(8, 2, renormalize=True)),
    MoESpec(24, 16, RouterConfig(16, 3, score="sigmoid", score_bias=True, n_group=4, topk_group=2,
                                 group_score="top2_sum"), shared=SharedExpertConfig(16, gated=True)),
    MoESpec(32, 16, RouterConfig(4, 1), glu=False, activation="relu"),
    MoESpec(32, 16, RouterConfig(4, 2, order="topk_then_score", router_bias=True), expert_bias=True,
            act_alpha=1.702, glu_limit=0.5, up_shift=1.0),
], ids=["softmax", "sigmoid_groups_shared", "relu_k1", "gpt_oss_clamped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_token_is_isolated(spec, dtype):
    """A NaN in one token's input makes that token's output NaN and leaves every other token's
    output as computed without it (the NaN token ranks its experts 0..k-1, as the reference)."""
    T, bad = 21, 6
    gen = torch.Generator().manual_seed(5)
    w = make_weights(spec, dtype, gen)
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    keep = separated(spec, x, w)
    keep[bad] = True
    x = x[keep]
    T = x.shape[0]
    clean = run_compiled(spec, dtype, ("y",), CPU, x, w)[0]
    x_nan = x.clone()
    x_nan[bad, 3] = float("nan")
    y = run_compiled(spec, dtype, ("y",), CPU, x_nan, w)[0]
    assert torch.isnan(y[bad]).all(), y[bad]
    others = torch.arange(T) != bad
    assert not torch.isnan(y[others]).any()
    # unchanged up to rounding: the NaN token's pairs shift other rows within the GEMM tiles,
    # and the interpreter's numpy/BLAS dot may round a row differently at another position
    tight = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(y[others], clean[others], rtol=tight, atol=tight * clean[others].abs().max().item())
    want = ref.moe(x_nan, w, spec)[0]
    assert torch.isnan(want[bad]).all()
    assert_matches([y[others]], [want[others]], ("y",), dtype, T - 1, spec.hidden, spec.num_experts)


def test_no_recompilation_across_token_counts():
    """One compile serves every token count: no new compile_spec miss and no new kernel module
    after the first call of each kernel."""
    spec = MoESpec(24, 20, RouterConfig(8, 2, renormalize=True, aux_loss=True, capacity_factor=2.0),
                   activation="gelu", shared=SharedExpertConfig(12, gated=True))
    outputs = ("y", "aux")
    gen = torch.Generator().manual_seed(9)
    w = make_weights(spec, torch.float32, gen)
    before = compiler.cache_info()
    compile_spec(spec, torch.float32, outputs, CPU)
    misses = compiler.cache_info().misses
    assert misses == before.misses + 1
    modules = None
    for T in (1, 7, 300):
        x = torch.randn(T, 24, generator=gen)
        got = run_compiled(spec, torch.float32, outputs, CPU, x, w)
        assert_matches(got, reference_outputs(spec, outputs, x, w), outputs, torch.float32, T, 24, 8)
        if modules is None:
            modules = len(cache._modules)
        assert len(cache._modules) == modules, f"T={T} imported a new kernel module"
        assert compiler.cache_info().misses == misses, f"T={T} recompiled"


# ----------------------------------------------------------------------------------------------
# problems this file found, now fixed: each stays as a regression test

def test_noisy_logits_output_in_training_is_the_router_linear():
    """The ``logits`` output is the router's linear in the IR (``linear`` -> ``logits``, the
    noise is added inside ``route``), and `Region.reference` (the backward) uses the clean
    logits too; training mode must not change it."""
    spec = MoESpec(16, 16, RouterConfig(8, 2, noisy=True))
    gen = torch.Generator().manual_seed(4)
    w = make_weights(spec, torch.float32, gen)
    x = torch.randn(9, 16, generator=gen)
    noise = torch.randn(9, 8, generator=gen)
    keep = separated(spec, x, w, noise)
    x, noise = x[keep], noise[keep]
    got = run_compiled(spec, torch.float32, ("y", "logits"), CPU, x, w, training=True, noise=noise)
    want = [ref.moe(x, w, spec, noise=noise)[0], ref.router_logits(x, w.w_router)]
    assert_matches(got, want, ("y", "logits"), torch.float32, x.shape[0], 16, 8)


@pytest.mark.parametrize("options", [dict(score_bias=True), dict(n_group=4, topk_group=1)],
                         ids=["score_bias", "groups"])
def test_topk_then_score_with_selection_options_is_rejected(options):
    """top-k-then-softmax ranks raw logits: a selection bias or group limit has no meaning there."""
    with pytest.raises(MoESpecError, match="topk_then_score"):
        RouterConfig(8, 2, order="topk_then_score", **options)


def test_aux_output_without_aux_loss_is_a_clear_error():
    spec = MoESpec(16, 16, RouterConfig(4, 1))
    with pytest.raises(ValueError, match="aux_loss"):
        compile_spec(spec, torch.float32, ("y", "aux"), CPU)


@pytest.mark.parametrize("options, cause", [
    (dict(activation="gelu", act_alpha=1.702), "silu only"),
    (dict(glu=False, glu_limit=7.0), "not gated"),
    (dict(glu=False, up_shift=1.0), "not gated"),
    (dict(glu_limit=-1.0), "glu_limit"),
    (dict(act_alpha=float("inf")), "act_alpha"),
    (dict(activation="gelu", gate_softcap=3.0), "gate_softcap applies to silu only"),
    (dict(glu=False, up_softcap=3.0), "not gated"),
    (dict(up_softcap=0.0), "up_softcap must be a positive"),
], ids=["alpha_on_gelu", "limit_without_glu", "shift_without_glu", "negative_limit", "infinite_alpha",
        "gate_softcap_on_gelu", "up_softcap_without_glu", "zero_softcap"])
def test_bad_glu_variant_is_a_clear_error(options, cause):
    with pytest.raises(MoESpecError, match=cause):
        MoESpec(16, 16, RouterConfig(4, 1), **options)


@pytest.mark.parametrize("options, cause", [
    (dict(capacity_factor=1.0, expert_capacity=4), "not both"),
    (dict(expert_capacity=0), "expert_capacity must be an int >= 1"),
    (dict(capacity_factor=1.0, min_capacity=-1), "min_capacity must be an int >= 0"),
    (dict(capacity_per="sequence"), "describe an expert capacity"),
    (dict(dropped="pass"), "describe an expert capacity"),
    (dict(capacity_factor=1.0, capacity_per="row"), "capacity_per must be one of"),
    (dict(capacity_factor=1.0, dropped="pass", overflow="next_best"), "needs overflow='drop'"),
    (dict(capacity_factor=1.0, renormalize_kept=True), "renormalize_kept normalises"),
    (dict(renormalize=True, renormalize_kept=True), "describe an expert capacity"),
], ids=["factor_and_fixed", "zero_fixed", "zero_minimum", "per_sequence_without_capacity", "pass_without_capacity",
        "unknown_group", "pass_with_next_best", "kept_without_renormalize", "kept_without_capacity"])
def test_bad_capacity_is_a_clear_error(options, cause):
    with pytest.raises(MoESpecError, match=cause):
        RouterConfig(4, 1, **options)


def test_sequences_that_do_not_tile_the_call_are_an_error():
    cfg = RouterConfig(4, 1, expert_capacity=2, capacity_per="sequence")
    with pytest.raises(MoESpecError, match="not sequences of 4"):
        ref.route(torch.randn(10, 4), cfg, None, 4)


def test_bias_of_the_wrong_shape_is_rejected_by_the_verifier():
    from moec.ir.build import build_moe_graph
    from moec.ir.ops import IRError
    from moec.ir.text import parse_graph, print_graph
    from moec.ir.verify import verify
    spec = MoESpec(16, 8, RouterConfig(4, 2), expert_bias=True)
    text = print_graph(build_moe_graph(spec, torch.float32))
    bad = text.replace("%b_up: f32[4, 8]", "%b_up: f32[4, 16]")
    assert bad != text
    with pytest.raises(IRError, match="bias"):
        verify(parse_graph(bad))
