"""The frontend: every zoo MoE lifts to the right spec, and the spec computes what the module does.

Each positive case is lifted once (cached); tests that change a module work on a deep copy
(the LiftedMoE stays valid: it reads tensors by path).
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from moec import reference
from moec.frontend import LiftedMoE, NotLifted, find_moe_modules, lift, outputs, probe
from moec.frontend.probe import near_ties

# id: (factory, formulation prefix, RouterConfig fields, MoESpec fields, outputs)
CASES = {
    "mixtral": (lambda: zoo.MixtralMoE(), "module-list loop",
                dict(top_k=2, score="softmax", order="score_then_topk", renormalize=True), dict(ffn=32, activation="silu", glu=True), "y"),
    "mixtral_no_renorm": (lambda: zoo.MixtralMoE(norm_topk_prob=False), "module-list loop",
                          dict(top_k=2, renormalize=False), dict(activation="silu"), "y"),
    "mixtral_skip_empty": (lambda: zoo.MixtralSkipEmptyMoE(k=3), "module-list loop",
                           dict(top_k=3, renormalize=True), dict(activation="silu"), "y"),
    "mixtral_topk_softmax": (lambda: zoo.MixtralTopkSoftmaxMoE(), "module-list loop",
                             dict(top_k=2, order="topk_then_score"), dict(activation="silu"), "y"),
    "mixtral_logits": (lambda: zoo.MixtralLogitsMoE(), "module-list loop",
                       dict(top_k=2, renormalize=True), {}, "y_logits"),
    "stacked_sort": (lambda: zoo.StackedSortMoE(), "stacked 3-D weights",
                     dict(top_k=2, score="softmax", renormalize=False), dict(ffn=32, activation="silu", glu=True), "y"),
    "stacked_gather_bmm": (lambda: zoo.StackedGatherBmmMoE(), "stacked 3-D weights, gather + bmm",
                           dict(top_k=2, renormalize=True), dict(ffn=32, activation="gelu_tanh", glu=True), "y"),
    "stacked_experts_module": (lambda: zoo.StackedExpertsModuleMoE(), "stacked 3-D weights",
                               dict(top_k=2, renormalize=True), dict(ffn=32, activation="silu", glu=True), "y"),
    "dense_one_hot": (lambda: zoo.DenseOneHotMoE(), "dense one-hot",
                      dict(top_k=2, score="sigmoid", renormalize=True, routed_scaling=2.0),
                      dict(ffn=24, activation="gelu", glu=False), "y"),
    "deepseek_v3": (lambda: zoo.DeepseekV3MoE(), "module-list loop",
                    dict(top_k=3, score="sigmoid", score_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
                         renormalize=True, routed_scaling=2.5),
                    dict(activation="silu"), "y"),
    "deepseek_v2": (lambda: zoo.DeepseekV2MoE(), "module-list loop",
                    dict(top_k=2, score="softmax", n_group=4, topk_group=2, group_score="max", renormalize=False,
                         routed_scaling=16.0), dict(activation="silu"), "y"),
    "switch_relu": (lambda: zoo.SwitchMoE(), "module-list loop",
                    dict(top_k=1, score="softmax", renormalize=False, router_bias=False),
                    dict(activation="relu", glu=False), "y"),
    "switch_gelu_bias": (lambda: zoo.SwitchMoE(act="gelu", router_bias=True), "module-list loop",
                         dict(top_k=1, renormalize=False, router_bias=True), dict(activation="gelu", glu=False), "y"),
    "qwen": (lambda: zoo.QwenMoE(), "module-list loop",
             dict(top_k=2, score="softmax", renormalize=False), dict(activation="silu"), "y_logits"),
    "capacity_drop": (lambda: zoo.CapacityMoE(), "module-list loop",
                      dict(top_k=2, capacity_factor=1.0, overflow="drop", renormalize=False), {}, "y"),
    "capacity_next_best": (lambda: zoo.CapacityMoE(overflow="next_best", norm_topk_prob=True), "module-list loop",
                           dict(top_k=2, capacity_factor=1.0, overflow="next_best", renormalize=True), {}, "y"),
    "noisy": (lambda: zoo.NoisyTopKMoE(), "module-list loop",
              dict(top_k=2, noisy=True, order="topk_then_score"), dict(activation="relu", glu=False), "y"),
    "aux_loss": (lambda: zoo.AuxLossMoE(), "module-list loop",
                 dict(top_k=2, aux_loss=True, renormalize=True), dict(activation="silu", glu=True), "y_aux"),
    "plain_linear": (lambda: zoo.PlainLinearMoE(), "module-list loop",
                     dict(top_k=2, renormalize=True), dict(activation="silu", glu=True), "y"),
    "st_moe": (lambda: zoo.STMoE(), "module-list loop",
               dict(top_k=2, renormalize=True, aux_loss=True), dict(activation="silu"), "y_aux_zloss_counts"),
    "logits_zloss": (lambda: zoo.LogitsZLossMoE(), "module-list loop",
                     dict(top_k=2, renormalize=True), dict(activation="silu"), "y_logits_zloss_none"),
    "relu2_experts": (lambda: zoo.Relu2ExpertMoE(), "module-list loop",
                      dict(top_k=2, renormalize=True), dict(activation="relu2", glu=False), "y"),
    "logits_bias_topk": (lambda: zoo.LogitsBiasTopKMoE(), "module-list loop",
                         dict(top_k=2, score="sigmoid", order="logits_then_score", score_bias=True, renormalize=True),
                         dict(activation="silu"), "y"),
    "biased_experts": (lambda: zoo.BiasedExpertMoE(), "module-list loop",
                       dict(top_k=2, renormalize=True), dict(activation="silu", glu=True, expert_bias=True), "y"),
    "biased_fused_experts": (lambda: zoo.BiasedFusedExpertMoE(), "module-list loop",
                             dict(top_k=2, renormalize=True), dict(activation="gelu", glu=True, expert_bias=True), "y"),
    "switch_capacity": (lambda: zoo.SwitchCapacityMoE(), "module-list loop",
                        dict(top_k=1, expert_capacity=3, capacity_per="sequence", dropped="pass", capacity_factor=None),
                        dict(activation="relu", glu=False), "y_logits"),
    "fairseq_top2": (lambda: zoo.FairseqTop2MoE(), "module-list loop",
                     dict(top_k=2, renormalize=True, capacity_factor=0.5, renormalize_kept=True, aux_loss=True,
                          aux_counts="first"), dict(activation="silu"), "y_aux"),
    "dense_dispatch": (lambda: zoo.DenseDispatchMoE(), "stacked 3-D weights",
                       dict(top_k=2, renormalize=True, capacity_factor=1.0, min_capacity=4, capacity_per="batch",
                            dropped="zero"), dict(activation="relu", glu=False), "y"),
}
SHARED = {"deepseek_v3": (16, False), "qwen": (48, True), "logits_bias_topk": (32, False)}


@functools.lru_cache(maxsize=None)
def lifted_case(case: str):
    torch.manual_seed(sum(map(ord, case)))
    m = CASES[case][0]()
    if case != "noisy":
        m.eval()
    return m, lift(m)


def fresh(case: str) -> tuple[nn.Module, LiftedMoE]:
    m, lifted = lifted_case(case)
    return copy.deepcopy(m), lifted


def inputs(d: int, T: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (1, T, d) if T < 8 else (2, T // 2, d)
    return torch.randn(shape, generator=g).to(dtype)


def unpack(out):
    """``(y, the second item or None)``: the other items are checked by `assert_extra_items`."""
    return (out[0], out[1] if len(out) > 1 else None) if isinstance(out, tuple) else (out, None)


def assert_matches(m, lifted, x, noise=None):
    """m(x) == reference.moe per ``lifted.outputs`` (tokens at a routing tie excluded in fp16)."""
    d, E = lifted.spec.hidden, lifted.spec.num_experts
    y, extra = unpack(m(x))
    x2 = x.reshape(-1, d)
    w = lifted.weights(lifted.param_tensors(m))
    group = x.shape[-2] if x.dim() == 3 else None
    y_ref, aux = reference.moe(x2, w, lifted.spec, noise, group)
    assert y.shape == x.shape and y.dtype == x.dtype
    rtol = 1e-4 if x.dtype == torch.float32 else 2e-2
    logits = reference.router_logits(x2, w.w_router, w.b_router, w.w_noise, noise)
    keep = ~near_ties(logits, lifted.spec.router, w.score_bias, x.dtype)
    scale = y_ref.float().abs().max().item()
    err = (y.reshape(-1, d).float() - y_ref.float())[keep].abs().max().item() if keep.any() else 0.0
    assert err <= rtol * scale + 1e-6, f"max error {err} vs scale {scale}"
    if lifted.outputs == "y_logits":
        torch.testing.assert_close(extra.reshape(-1, E).float(), logits.to(x.dtype).float(), rtol=rtol, atol=rtol)
    elif lifted.outputs == "y_aux":
        torch.testing.assert_close(extra.float(), aux.float(), rtol=rtol, atol=1e-5)
    elif lifted.outputs == "y":
        assert extra is None
    else:
        out = m(x)
        for kind, item in zip(lifted.outputs.split("_")[1:], out[1:]):
            want = {"logits": logits, "aux": aux, "none": None}.get(kind)
            if kind in ("zloss", "ids", "counts"):
                want = outputs.derive(kind, logits, lifted.spec.router, w.score_bias, group)
            if want is None:
                assert item is None
            elif kind in ("ids", "counts"):
                assert torch.equal(item.long(), want.long())
            else:
                torch.testing.assert_close(item.reshape(want.shape).float(), want.float(), rtol=rtol, atol=rtol)


# ---- positive cases -------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_lift_recognises_spec(case):
    _, formulation, router, spec_fields, outputs = CASES[case]
    m, lifted = lifted_case(case)
    assert isinstance(lifted, LiftedMoE), lifted
    assert lifted.formulation.startswith(formulation), lifted.formulation
    assert lifted.outputs == outputs
    for k, v in router.items():
        assert getattr(lifted.spec.router, k) == v, (k, lifted.spec.router)
    for k, v in spec_fields.items():
        assert getattr(lifted.spec, k) == v, (k, lifted.spec)
    if case in SHARED:
        width, gated = SHARED[case]
        assert (lifted.spec.shared.width, lifted.spec.shared.gated) == (width, gated)
    else:
        assert lifted.spec.shared is None
    assert lifted.notes and any("probe" in n for n in lifted.notes)
    assert probe(m, lifted) is None


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_module(case):
    m, lifted = fresh(case)
    m.eval()
    with torch.no_grad():
        for T, seed in ((1, 11), (7, 12), (40, 13)):
            assert_matches(m, lifted, inputs(lifted.spec.hidden, T, seed=seed))
        if lifted.spec.router.has_capacity:   # the inputs do overflow
            x = inputs(lifted.spec.hidden, 40, seed=13)
            w = lifted.weights(lifted.param_tensors(m))
            logits = reference.router_logits(x.reshape(-1, lifted.spec.hidden), w.w_router)
            capped = reference.route(logits, lifted.spec.router, None, x.shape[-2])[0]
            free = reference.route(logits, lifted.spec.router.without_capacity())[0]
            assert not torch.equal(capped, free)


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_module_fp16(case):
    m, lifted = fresh(case)
    m.eval().half()
    with torch.no_grad():
        for T, seed in ((1, 21), (9, 22), (40, 23)):
            assert_matches(m, lifted, inputs(lifted.spec.hidden, T, torch.float16, seed=seed))


@pytest.mark.parametrize("case", CASES)
def test_weights_carry_gradients(case):
    m, lifted = fresh(case)
    m.eval()
    d = lifted.spec.hidden
    x = inputs(d, 12, seed=31)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(32))
    y, extra = unpack(m(x))
    loss = (y * g).sum() + (extra if lifted.outputs == "y_aux" else 0)
    tensors = lifted.param_tensors(m)
    trainable = [t for t in tensors if t.requires_grad]
    eager = torch.autograd.grad(loss, trainable, allow_unused=True)
    y_ref, aux = reference.moe(x.reshape(-1, d), lifted.weights(tensors), lifted.spec, None, x.shape[-2])
    loss_ref = (y_ref.reshape(x.shape) * g).sum() + (aux if lifted.outputs == "y_aux" else 0)
    ref = torch.autograd.grad(loss_ref, trainable, allow_unused=True)
    assert trainable
    for t, a, b in zip(trainable, eager, ref):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert any(b is not None and b.abs().sum() > 0 for b in ref)


def test_noisy_gating_in_training_mode():
    m, lifted = fresh("noisy")
    m.train()
    assert lifted.noise_dtype == torch.float32
    x = inputs(lifted.spec.hidden, 24, seed=41)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        y_train = m(x)
        torch.manual_seed(5)
        noise = torch.randn(24, lifted.spec.num_experts, dtype=lifted.noise_dtype)
        y_ref, _ = reference.moe(x.reshape(24, -1), lifted.weights(lifted.param_tensors(m)), lifted.spec, noise)
        torch.testing.assert_close(y_train.reshape(24, -1), y_ref, rtol=1e-4, atol=1e-5)
        m.eval()
        assert not torch.allclose(m(x), y_train)   # noise only in training
        assert_matches(m, lifted, x)


def test_fp16_module_lifts_directly():
    torch.manual_seed(3)
    m = zoo.DeepseekV3MoE().eval().half()
    lifted = lift(m)
    assert isinstance(lifted, LiftedMoE), lifted
    assert lifted.spec.router.group_score == "top2_sum" and lifted.spec.router.score_bias
    with torch.no_grad():
        assert_matches(m, lifted, inputs(16, 30, torch.float16, seed=51))


def test_weight_updates_are_seen():
    for case, param in (("mixtral", "gate.weight"), ("stacked_gather_bmm", "gate_up_proj"),
                        ("qwen", "shared_expert_gate.weight")):
        m, lifted = fresh(case)
        m.eval()
        p = m.get_parameter(param)
        before = [t.clone() for t in lifted.param_tensors(m)]
        with torch.no_grad():
            p.add_(0.25)
            after = lifted.param_tensors(m)
            assert any(not torch.equal(a, b) for a, b in zip(before, after))
            w = lifted.weights(after)
            if param == "gate.weight":
                assert torch.equal(w.w_router, p)
            assert_matches(m, lifted, inputs(lifted.spec.hidden, 10, seed=61))


def test_probe_catches_a_wrong_spec():
    m, lifted = lifted_case("mixtral")
    wrong = dataclasses.replace(lifted, spec=dataclasses.replace(
        lifted.spec, router=lifted.spec.router.replace(renormalize=False)))
    msg = probe(m, wrong)
    assert msg and "output" in msg
    wrong_act = dataclasses.replace(lifted, spec=dataclasses.replace(lifted.spec, activation="gelu"))
    assert probe(m, wrong_act)


def test_lift_leaves_module_and_rng_alone():
    torch.manual_seed(4)
    m = zoo.DeepseekV3MoE()                      # training mode, as constructed
    state = copy.deepcopy(m.state_dict())
    attrs = set(vars(m))
    rng = torch.get_rng_state()
    assert isinstance(lift(m), LiftedMoE)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(mod.training for mod in m.modules())
    assert set(vars(m)) == attrs
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---- negative cases -------------------------------------------------------------------------

def _biased_shared_qwen():
    m = zoo.QwenMoE().eval()
    m.shared_expert.up_proj = nn.Linear(16, m.shared_expert.up_proj.out_features, bias=True)
    return m


@pytest.mark.parametrize("factory, words", [
    (lambda: zoo.TanhExpertMoE(), ("tanh", "activation")),
    (lambda: zoo.PartialBiasExpertMoE(), ("w3 has a bias but", "all or none")),
    (lambda: _biased_shared_qwen(), ("shared_expert.up_proj has a bias", "bias-free")),
    (lambda: zoo.ExtraArgMoE(), ("attention_mask", "argument")),
    (lambda: zoo.TemperatureMoE(), ("no candidate",)),
])
def test_unsupported_modules_say_why(factory, words):
    torch.manual_seed(0)
    m = factory()
    got = lift(m)
    assert isinstance(got, NotLifted), got
    assert type(m).__name__ in got.reason
    for w in words:
        assert w in got.reason, got.reason


def test_meta_device_is_not_lifted():
    with torch.device("meta"):
        m = zoo.MixtralMoE()
    got = lift(m)
    assert isinstance(got, NotLifted) and "meta" in got.reason


class _Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)
        self.experts = nn.ModuleList([zoo.GatedMLP(16, 8) for _ in range(4)])

    def forward(self, hidden_states):
        raise RuntimeError("boom")


@pytest.mark.parametrize("factory", [
    lambda: zoo.DenseMLP(), lambda: nn.Linear(4, 4), lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
    lambda: nn.TransformerEncoderLayer(16, 2, 32), lambda: nn.ModuleList([zoo.GatedMLP(4, 8)] * 3),
    lambda: nn.Module(), lambda: _Raises(),
])
def test_arbitrary_modules_never_raise(factory):
    m = factory()
    got = lift(m)
    assert got is None or isinstance(got, NotLifted)
    if isinstance(got, NotLifted):
        assert got.reason
    if isinstance(m, _Raises):
        assert isinstance(got, NotLifted) and "boom" in got.reason


def test_find_moe_modules():
    class Block(nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.mlp = moe

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(zoo.MixtralMoE()), Block(zoo.DenseMLP()), Block(zoo.QwenMoE()), nn.Linear(16, 4))
    found = find_moe_modules(model)
    assert [n for n, _ in found] == ["0.mlp", "2.mlp"]
    assert all(isinstance(lift(m), LiftedMoE) for _, m in found)


def test_a_linear_is_what_computes_one():
    """`as_linear`: nn.Linear, or a module computing F.linear(x, weight, bias), checked by calling it;
    a module with a weight that computes something else is none (must not fire)."""
    from moec.frontend.linears import as_linear

    class Scaled(zoo.PlainLinear):
        def forward(self, x):
            return super().forward(x) * 2

    class InOut(nn.Module):                       # x @ W with W [in, out]: not F.linear's layout
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 8))

        def forward(self, x):
            return x @ self.weight

    class Lora(zoo.PlainLinear):                  # more state than a linear's: its output moves with it
        def __init__(self):
            super().__init__(16, 8)
            self.lora_a = nn.Parameter(torch.randn(4, 16))
            self.lora_b = nn.Parameter(torch.zeros(8, 4))

        def forward(self, x):
            return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)

    torch.manual_seed(0)
    assert as_linear(Lora()) is None
    lin = zoo.PlainLinear(16, 8, bias=True)
    assert as_linear(lin)[:2] == (16, 8) and as_linear(lin).bias is lin.bias
    assert as_linear(zoo.PlainLinear(16, 8)).bias is None
    assert as_linear(Scaled(16, 8)) is None
    assert as_linear(InOut()) is None
    m = zoo.PlainLinear(16, 8)
    assert as_linear(m) is not None
    m.forward = lambda x: x.new_zeros(x.shape[0], 8)   # checked again when the forward changes
    assert as_linear(m) is None


class _Statics(nn.Module):
    """ERNIE-style: the selection bias kept in a submodule of the router, as a [1, E] parameter."""

    def __init__(self, E):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.randn(1, E) * 0.3, requires_grad=False)

    def forward(self, probs):
        return probs + self.e_score_correction_bias.squeeze()


class _StaticsRouter(nn.Module):
    def __init__(self, d, E, k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, d) / d ** 0.5)
        self.moe_statics = _Statics(E)
        self.top_k = k

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        _, ids = torch.topk(self.moe_statics(probs), self.top_k, dim=-1)
        w = torch.gather(probs, -1, ids)
        return w / torch.clamp(w.sum(-1, keepdim=True), min=1e-12), ids


class StaticsBiasMoE(nn.Module):
    def __init__(self, d=16, f=24, E=6, k=2):
        super().__init__()
        self.gate = _StaticsRouter(d, E, k)
        self.experts = nn.ModuleList(zoo.GatedMLP(d, f) for _ in range(E))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, ids = self.gate(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None].to(x.dtype))
        return y.reshape(shape)


def test_a_selection_bias_inside_the_router_is_found():
    """ERNIE 4.5 keeps its selection bias as ``gate.moe_statics.e_score_correction_bias`` ([1, E]): lifted with it,
    forward and gradients equal to eager's."""
    import moec
    torch.manual_seed(0)
    eager = StaticsBiasMoE().train()
    got = lift(eager)
    assert isinstance(got, LiftedMoE) and got.spec.router.score_bias, got
    compiled = moec.compile(copy.deepcopy(eager))
    x = torch.randn(2, 7, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), eager(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert compiled.__dict__["_moec_region"].calls["kernels forward and backward"] == 1


class _PostNormMoE(nn.Module):
    """A Mixtral layer whose combined output goes through a LayerNorm (AXK1's post_mlp_layernorm)."""

    def __init__(self):
        super().__init__()
        self.moe = zoo.MixtralMoE()
        self.gate, self.experts = self.moe.gate, self.moe.experts
        self.post_norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.post_norm(self.moe(x))


class _CappedSwiGLU(nn.Module):
    def forward(self, gate, up):
        return 8.0 * torch.tanh(F.silu(gate) / 8.0) * up


class _CappedExpert(zoo.GatedMLP):
    def __init__(self, d, f):
        super().__init__(d, f)
        self.act_fn = _CappedSwiGLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


def test_explain_names_the_norm_or_activation_a_layer_lacks():
    """When no configuration reproduces a layer, the reason starts with what it holds that moec does not
    compute: a norm not on the combined output (one on it is lifted: run after the kernels), an expert
    activation of its own."""
    got = lift(_PostNormMoE())
    assert not isinstance(got, NotLifted) and got.post == "post_norm", got
    got = lift(zoo.PreNormMoE())
    assert isinstance(got, NotLifted) and "a norm outside the experts that the forward does not apply to the " \
        "combined output alone (in_norm)" in got.reason, got
    m = zoo.MixtralMoE()
    m.experts = nn.ModuleList(_CappedExpert(16, 32) for _ in range(4))
    got = lift(m)
    assert isinstance(got, NotLifted) and "an expert activation of its own, _CappedSwiGLU" in got.reason, got


class _TrackedSiLU(nn.Module):
    """silu scaled by a running amax its forward updates (a stateful activation moec does not compute)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("amax", torch.ones(()))

    def forward(self, x):
        if x.numel():
            self.amax.copy_(torch.maximum(self.amax, x.detach().abs().max()))
        return F.silu(x) / self.amax


def test_reading_an_activation_leaves_its_state_alone():
    """Deciding which activation a module computes evaluates a copy of it: a layer that stays eager answers as
    its eager copy, its buffers untouched."""
    import moec
    torch.manual_seed(0)
    m = zoo.MixtralMoE()
    for e in m.experts:
        e.act_fn = _TrackedSiLU()
    eager = copy.deepcopy(m)
    compiled = moec.compile(m)
    assert [float(e.act_fn.amax) for e in compiled.experts] == [1.0] * 4
    x = torch.randn(1, 8, 16) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)


@pytest.mark.parametrize("capacity", [30, 64])
def test_a_capacity_the_probe_sizes_cannot_reach_is_confirmed_on_longer_sequences(capacity):
    """Switch's fixed capacity of 64 never binds on the probe's 48 tokens: the probe adds sequences where it
    does, so the per-sequence rule and the pass-through are read, and long inputs match eager."""
    import moec
    torch.manual_seed(0)
    m = zoo.SwitchCapacityMoE(expert_capacity=capacity).eval()
    ref = copy.deepcopy(m)
    moec.compile(m)
    r = m.__dict__["_moec_region"].lifted.spec.router
    assert (r.expert_capacity, r.capacity_per, r.dropped) == (capacity, "sequence", "pass"), r
    with torch.no_grad():
        for shape in ((2, 40, 16), (2, 300, 16)):
            x = torch.randn(shape)
            for a, b in zip(m(x), ref(x)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_per_sequence_capacity_runs_other_input_ranks_eagerly():
    """The sequence is the second-to-last dim of the [B, S, d] inputs the probe confirmed: a [T, d] or
    [A, B, S, d] input runs the eager forward (which may itself refuse it)."""
    import moec
    torch.manual_seed(0)
    m = zoo.SwitchCapacityMoE(expert_capacity=2).eval()
    ref = copy.deepcopy(m)
    moec.compile(m)
    with torch.no_grad():
        x = torch.randn(2, 3, 4, 16)
        for a, b in zip(m(x), ref(x)):
            torch.testing.assert_close(a, b)
        with pytest.raises(IndexError):
            ref(torch.randn(5, 16))
        with pytest.raises(IndexError):
            m(torch.randn(5, 16))
    assert "confirmed on [batch, sequence, hidden] inputs" in m.explain(), m.explain()


def test_a_truncated_capacity_is_read_as_one():
    """``int(cf * T * k / E)`` equals the ceiling at the probe's token counts: the long inputs tell them apart."""
    import moec
    torch.manual_seed(0)
    m = zoo.FloorCapacityMoE().eval()
    ref = copy.deepcopy(m)
    moec.compile(m)
    r = m.__dict__["_moec_region"].lifted.spec.router
    assert (r.capacity_round, r.min_capacity) == ("floor", 4), r
    gen = torch.Generator().manual_seed(1)
    lean = 4 * ref.gate.weight[0] / ref.gate.weight[0].pow(2).sum()
    with torch.no_grad():
        for T in (5, 18, 22, 30, 50):
            x = torch.randn(1, T, 16, generator=gen) * 0.5 + lean
            torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [zoo.SequenceFirstSwitchMoE, zoo.GroupedCapacityMoE])
def test_capacities_the_probe_sizes_cannot_tell_stay_correct_on_long_inputs(cls):
    """A capacity over dim 0 of [S, B, d] inputs, or per group of 64 tokens, looks like none (or a per-batch one)
    at the probe's 48 tokens: the long inputs show otherwise, and no wrong reading is lifted."""
    import moec
    torch.manual_seed(0)
    m = cls().eval()
    ref = copy.deepcopy(m)
    moec.compile(m)
    with torch.no_grad():
        for shape in ((2, 100, 16), (100, 2, 16), (1, 150, 16)):
            x = torch.randn(shape)
            a, b = m(x), ref(x)
            for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_fp16_weights_over_the_kept_pairs_run_eager():
    """Eager code clamps the kept pairs' sum at its dtype's eps (fp16: 1e-3), moec at fp32's: after ``.half()``
    the layer is lifted again for its fp16 weights (a guarded change), no reading reproduces the fp16 forward,
    and the call runs the eager forward and says why."""
    import moec
    torch.manual_seed(0)
    m = zoo.FairseqTop2MoE().eval()
    ref = copy.deepcopy(m)
    moec.compile(m)
    m.half(), ref.half()
    x = torch.randn(2, 12, 16).half()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
    assert "float32 -> float16" in m.explain() and "not liftable" in m.explain(), m.explain()
