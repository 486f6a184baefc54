"""The IR itself: text round trip, verifier rules, symbolic shapes, interpreter vs reference."""
import pytest
import sympy
import torch

from moec import reference
from moec.ir import IRError, T, build_moe_graph, interpret, parse_graph, print_graph, verify
from moec.ir.build import moe_inputs
from moec.spec import MoESpec, MoESpecError, MoEWeights, RouterConfig, SharedExpertConfig

SPEC = MoESpec(16, 24, RouterConfig(4, 2, renormalize=True), shared=SharedExpertConfig(8, gated=True))


def weights(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, d, f = spec.num_experts, spec.hidden, spec.ffn
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    fs = spec.shared.width if spec.shared else 0
    return MoEWeights(w_router=r(E, d), w_up=r(E, f, d), w_down=r(E, d, f), w_gate=r(E, f, d) if spec.glu else None,
                      shared_up=r(fs, d) if fs else None, shared_down=r(d, fs) if fs else None,
                      shared_gate=r(fs, d) if fs and spec.glu else None,
                      shared_gate_proj=r(1, d) if spec.shared and spec.shared.gated else None)


def test_round_trip_and_symbolic_shapes():
    g = build_moe_graph(SPEC, torch.float16, ("y", "logits"))
    text = print_graph(g)
    assert print_graph(parse_graph(text)) == text
    order = g.types["order"]
    assert order.shape == (2 * T,) and order.concrete(T=7) == (14,)
    assert isinstance(order.shape[0], sympy.Expr)


def test_interpreter_matches_reference():
    w = weights(SPEC)
    g = build_moe_graph(SPEC, torch.float32)
    for n in (0, 1, 11):
        x = torch.randn(n, 16)
        (y,) = interpret(g, moe_inputs(x, w))
        torch.testing.assert_close(y, reference.moe(x, w, SPEC)[0], rtol=1e-5, atol=1e-5)


def _break(text, old, new):
    assert old in text
    return parse_graph(text.replace(old, new, 1))


@pytest.mark.parametrize("old,new,msg", [
    ("route(logits=%logits)", "route(logits=%nowhere)", "not defined before use"),
    ("{num_experts=4, top_k=2, renormalize=True}", "{num_experts=4, top_k=5}", "top_k"),
    ("%h: f32[2*T, 24]", "%h: f32[2*T, 25]", "inferred"),
    ("activation='silu', glu=True}\n  %ys", "activation='tanh', glu=True}\n  %ys", "activation"),
    ("dispatch(ids=%ids) {num_experts=4}", "dispatch(ids=%ids) {num_experts=4, bogus=1}", "unknown attribute"),
    ("return %y", "return %zz", "output %zz"),
])
def test_verifier_names_the_broken_rule(old, new, msg):
    text = print_graph(build_moe_graph(SPEC, torch.float32))
    with pytest.raises(IRError, match=msg):
        verify(_break(text, old, new))


def test_duplicate_definition_rejected():
    g = build_moe_graph(SPEC, torch.float32)
    with pytest.raises(IRError, match="defined twice"):
        verify(g.with_nodes(g.nodes + (g.nodes[-1],)))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, top_k=0), "top_k"),
    (dict(num_experts=6, top_k=2, n_group=4), "n_group"),
    (dict(num_experts=8, top_k=4, n_group=4, topk_group=1), "fewer than top_k"),
    (dict(num_experts=4, top_k=2, score="tanh"), "score"),
    (dict(num_experts=4, top_k=2, score="sigmoid", order="topk_then_score"), "softmax"),
    (dict(num_experts=4, top_k=2, capacity_factor=0.0), "capacity"),
])
def test_router_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(MoESpecError, match=msg):
        RouterConfig(**kwargs)
