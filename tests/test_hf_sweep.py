"""Every MoE family of the installed transformers against eager (tests/hf_sweep.py): never wrong,
never a crash. CI checks a subset (a router that takes a selection bias as an argument, DeepSeek-V2's routing, a
selection bias inside the router, a softcapped SwiGLU, a post-combine norm, a clamped SwiGLU in routed and shared
experts, an MLP router whose block stays eager with its reason, its experts module on the kernels);
``HYPOTHESIS_PROFILE=large`` checks every family (hybrids, squared-ReLU experts, identity experts: LongCat-Flash,
input-scaled experts: Llama4)."""
import os

import pytest

pytest.importorskip("transformers")

import hf_sweep  # noqa: E402

SUBSET = ["afmoe", "deepseek_v2", "zaya", "ernie4_5_moe", "inkling2_text", "axk1", "minimax_m3_vl_text"]
ALL = os.environ.get("HYPOTHESIS_PROFILE") == "large"
NAMES = hf_sweep.families() if ALL else [n for n in SUBSET if n in hf_sweep.families()]


# routers called as router(x, e_score_correction_bias), hooked with output_router_logits; relu**2 experts; a
# selection bias kept in a submodule of the router (ERNIE); a softcapped SwiGLU module (Inkling2); a norm of the
# combined output (A.X-K1); a clamped SwiGLU in a custom gate and in the shared expert (MiniMax-M3); clamped routed
# experts beside a plain shared expert (HunYuan-V4); 256 identity experts behind the router (LongCat-Flash); experts
# whose input the routing weight scales (Llama4); hash routing by token id with sqrt(softplus) scores (DeepSeek-V4);
# a gate branching on its weight's dtype (HunYuan-V1)
MUST_LIFT = {"deepseek_v4", "hunyuan_v1_moe", "afmoe", "hy_v3", "minimax_m2", "nemotron_h", "deepseek_v2", "qwen3_next", "cohere2_moe",
             "ernie4_5_moe", "inkling2_text", "axk1", "minimax_m3_vl_text", "hy_v4", "longcat_flash",
             "lfm2_moe", "qwen4_exp_text", "bailing_hybrid", "llama4_text", "llama4"}

# blocks left eager whose experts modules run the kernels: an MLP router (Zaya), sparsemixer (PhiMoE), a
# decoder-layer MoE (Gemma4), routers that also score shared experts (Inkling), a branch on data (Kolibri1)
EXPERTS_ONLY = {"zaya", "phimoe", "gemma4", "gemma4_text", "inkling_text", "kolibri1"}


@pytest.mark.parametrize("name", NAMES)
def test_family_is_lifted_or_eager_never_wrong(name):
    outcome = hf_sweep.check(name)
    assert outcome.status in ("LIFTED", "EXPERTS", "EAGER", "SKIP"), f"{outcome.status}: {outcome.detail}"
    if outcome.status in ("EXPERTS", "EAGER"):
        assert outcome.detail, "explain() gives no reason"
    if name in EXPERTS_ONLY:
        assert outcome.status == "EXPERTS", f"{name}: {outcome.status} {outcome.detail}"
    if name in MUST_LIFT:
        assert outcome.status == "LIFTED", f"{name}: {outcome.status} {outcome.detail}"


def test_a_hooked_router_whose_call_cannot_be_repeated_runs_eager():
    import copy

    import torch

    import moec
    if "afmoe" not in hf_sweep.families():
        pytest.skip("no afmoe in this transformers")
    eager = hf_sweep.build("afmoe")
    model = moec.compile(copy.deepcopy(eager))
    regions = [m.__dict__["_moec_region"] for m in model.modules() if "_moec_region" in m.__dict__]
    assert regions and all(r.lifted.observed_calls for r in regions)   # router(x, expert_bias)
    for r in regions:
        r.lifted.observed_calls = {p: None for p in r.lifted.observed}
    ids = torch.randint(3, hf_sweep.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids, output_router_logits=True)
        want = eager(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=2e-4, atol=2e-4)
    assert "hooks on the router" in model.explain()


@pytest.mark.parametrize("path", ["compile", "experts_implementation"])
def test_softcapped_swiglu(path):
    """Inkling2's softcapped SwiGLU, with softcaps small enough to bend every activation: read off the
    activation module by evaluating it, forward and gradients equal to eager's, through ``moec.compile``
    and through ``experts_implementation="moec"``."""
    import copy

    import torch

    import moec
    import moec.hf
    if "inkling2_text" not in hf_sweep.families():
        pytest.skip("no inkling2_text in this transformers")
    caps = dict(mlp_gate_softcap=0.02, mlp_up_softcap=0.03)
    ids = torch.randint(3, hf_sweep.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():             # the caps matter: without them the logits differ
        plain = hf_sweep.build("inkling2_text", mlp_gate_softcap=1e4, mlp_up_softcap=1e4)(input_ids=ids).logits
    if path == "compile":
        eager = hf_sweep.build("inkling2_text", **caps)
        model = moec.compile(copy.deepcopy(eager))
    else:
        assert moec.hf.register()
        eager = hf_sweep.build("inkling2_text", experts_implementation="eager", **caps)
        model = hf_sweep.build("inkling2_text", experts_implementation="moec", **caps)
    _same_logits_and_gradients(eager, model, ids, "experts", unlike=plain)
    if path == "compile":
        specs = [m.__dict__["_moec_region"].spec for m in model.modules() if "_moec_region" in m.__dict__]
        assert specs and all((s.gate_softcap, s.up_softcap) == (0.02, 0.03) for s in specs)
        assert "gate_softcap=0.02, up_softcap=0.03" in model.explain()
    else:
        assert set(moec.hf.calls(model)) >= {"kernels forward and backward"}, moec.hf.calls(model)


def test_clamped_swiglu_in_routed_and_shared_experts():
    """MiniMax-M3: the experts' custom gate (``_apply_gate``: GPT-OSS's clamped SwiGLU on chunked halves) read
    by evaluating it, the shared expert computing the same; a clamp tight enough to bind on every token:
    logits and gradients equal eager's."""
    import copy

    import torch

    import moec
    name = "minimax_m3_vl_text"
    if name not in hf_sweep.families():
        pytest.skip(f"no {name} in this transformers")
    tight = dict(swiglu_limit=0.05, swiglu_alpha=1.702)
    ids = torch.randint(3, hf_sweep.VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():             # the clamp binds: without it the logits differ
        loose = hf_sweep.build(name, swiglu_limit=1e3, swiglu_alpha=1.702)(input_ids=ids).logits
    eager = hf_sweep.build(name, **tight)
    model = moec.compile(copy.deepcopy(eager))
    specs = [m.__dict__["_moec_region"].spec for m in model.modules() if "_moec_region" in m.__dict__]
    assert specs and all(s.glu_limit == 0.05 and s.act_alpha == 1.702 and s.up_shift == 1.0 and s.shared
                         for s in specs), specs
    _same_logits_and_gradients(eager, model, ids, ".mlp.", unlike=loose)


def _same_logits_and_gradients(eager, model, ids, params: str, unlike):
    """``model``'s logits and the gradients of the parameters whose names hold ``params`` equal ``eager``'s,
    and eager's logits differ from ``unlike`` (the feature under test changes the answer)."""
    import torch
    outs = []
    for net in (eager, model):
        out = net(input_ids=ids).logits
        out.square().mean().backward()
        outs.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if params in n}))
    (want, gw), (got, gg) = outs
    assert (want - unlike).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    assert gw and all(torch.allclose(gg[n], gw[n], rtol=1e-3, atol=1e-5) for n in gw if gw[n] is not None)


@pytest.mark.parametrize("shared", ["looser clamp", "plain"])
def test_a_shared_expert_that_computes_another_glu(shared):
    """A shared expert is checked on inputs that reach past the routed experts' clamp (they agree on small
    inputs). One computing plain SwiGLU beside clamped routed experts is lifted with its own GLU variant
    (`SharedExpertConfig.variant`); one with a looser clamp than theirs computes no form moec has: it runs as its
    own module beside the kernels (an external shared expert). Either way the compiled block is eager's answer
    at any scale."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch import nn

    import moec
    name = "minimax_m3_vl_text"
    if name not in hf_sweep.families():
        pytest.skip(f"no {name} in this transformers")

    class PlainShared(nn.Module):
        def __init__(self, src):
            super().__init__()
            self.gate_up_proj, self.down_proj = src.gate_up_proj, src.down_proj

        def forward(self, x):
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)

    torch.manual_seed(0)
    eager = hf_sweep.build(name, swiglu_limit=7.0, swiglu_alpha=1.702)
    blocks = [m for m in eager.modules() if type(m).__name__ == "MiniMaxM3VLSparseMoeBlock"]
    for b in blocks:
        if shared == "plain":
            b.shared_experts = PlainShared(b.shared_experts)
        else:
            b.shared_experts.swiglu_limit = 100.0
    model = moec.compile(copy.deepcopy(eager))
    lifted = [m.__dict__["_moec_region"].spec for m in model.modules()
              if getattr(m.__dict__.get("_moec_region"), "lifted", None)]
    if shared == "plain":
        assert lifted and all(s.glu_limit == 7.0 and s.shared.variant == () and s.shared_variant == {}
                              for s in lifted), lifted
        assert "shared expert f=" in model.explain() and "its own GLU: plain" in model.explain()
    else:
        assert lifted and all(s.shared is None for s in lifted), lifted
        assert "(an external shared expert)" in model.explain(), model.explain()
    compiled = [m for m in model.modules() if type(m).__name__ == "MiniMaxM3VLSparseMoeBlock"]
    for scale in (1.0, 30.0):
        x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)) * scale
        with torch.no_grad():
            torch.testing.assert_close(compiled[0](x), blocks[0](x))


def test_hy_v4_clamped_routed_experts_beside_a_plain_shared_expert():
    """HunYuan-V4's routed experts clamp their SwiGLU (a custom gate) while its shared expert does not: the
    layer is lifted with the shared expert's own (plain) GLU variant. A clamp tight enough to bind on every
    token: logits and gradients equal eager's (and the clamp changes the logits)."""
    import copy

    import torch

    import moec
    name = "hy_v4"
    if name not in hf_sweep.families():
        pytest.skip(f"no {name} in this transformers")
    ids = torch.randint(3, hf_sweep.VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loose = hf_sweep.build(name, swiglu_limit=1e3)(input_ids=ids).logits
    eager = hf_sweep.build(name, swiglu_limit=0.05)
    model = moec.compile(copy.deepcopy(eager))
    specs = [getattr(m.__dict__["_moec_region"], "spec", None) for m in model.modules() if "_moec_region" in m.__dict__]
    specs = [s for s in specs if s is not None]           # (the MoE layers' regions)
    assert specs and all(s.glu_limit == 0.05 and s.shared is not None and s.shared.variant == () for s in specs), specs
    _same_logits_and_gradients(eager, model, ids, ".mlp.", unlike=loose)


def test_an_moe_inside_a_decoder_layer_says_so_and_its_experts_run_on_moec():
    """Gemma4's MoE block is a part of its decoder layer's forward (beside attention and a dense MLP):
    explain() says so in words, and its experts module (transformers' experts interface) runs moec's kernels,
    under moec.compile as with experts_implementation="moec", with eager's logits."""
    import torch
    import moec
    import moec.hf
    from moec.hf import experts as hf_experts
    outcome = hf_sweep.check("gemma4_text")
    assert outcome.status == "EXPERTS", outcome
    assert "children of a layer that also computes self_attn" in outcome.detail, outcome.detail
    moec.hf.register()
    eager = hf_sweep.build("gemma4_text")
    fused = hf_sweep.build("gemma4_text", experts_implementation="moec")
    ids = torch.randint(3, hf_sweep.VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert hf_experts.calls(fused)["kernels"] >= 2
