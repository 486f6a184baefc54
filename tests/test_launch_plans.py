"""Launch plans: a program bound to its weights (`Program.bind`) makes each step's launch once per token
count, and a compiled layer keeps its binding exactly as long as its weights are the same tensors at the
same addresses with the same shapes, strides and dtypes; a tensor moec converts per call stays unbound."""
from __future__ import annotations

import copy

import pytest
import torch

import moec
import zoo
from moec.ir import interpret
from moec.ir.build import moe_inputs
from moec.runtime import program as program_mod


def _region(model):
    return model.__dict__["_moec_region"]


def _compiled(model, x2):
    region = _region(model)
    with torch.no_grad():
        model(x2.unsqueeze(0))
    return region, region.compiled_for(region.recipe, x2.dtype, x2.device)


@pytest.mark.parametrize("make", [zoo.MixtralMoE, zoo.DeepseekV3MoE, zoo.QwenMoE], ids=["mixtral", "deepseek", "qwen"])
def test_bound_program_equals_the_unbound_one_and_the_interpreter(make):
    """Every token count (no tokens, one, in the kernel's sort, past it), twice each: the plans made at the
    first call of a T serve the second."""
    torch.manual_seed(0)
    model = moec.compile(make().eval())
    region, c = _compiled(model, torch.randn(3, 16))
    tensors = region.tensors(model)
    w = region.weights(tensors)
    bound = c.program.bind(moe_inputs(torch.randn(3, 16), w))
    assert set(bound.bound) == set(c.program.static_inputs) and "x" not in bound.bound
    for T in (0, 1, 5, 16, 17, 40, 5, 1):
        x2 = torch.randn(T, 16)
        got = bound.run({"x": x2})
        plain = c.program.run(moe_inputs(x2, w))
        want = interpret(c.graph, moe_inputs(x2, w))
        for a, b, r in zip(got, plain, want):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_a_plan_is_made_once_per_token_count(monkeypatch):
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().eval())
    eager = copy.deepcopy(model)
    made = []
    original = program_mod.Step.plan
    monkeypatch.setattr(program_mod.Step, "plan", lambda self, T, bound: made.append(T) or original(self, T, bound))
    with torch.no_grad():
        for T in (1, 1, 1, 3, 3, 1):
            model(torch.randn(1, T, 16))
    n_steps = len(_region(model).compiled_for(_region(model).recipe, torch.float32, torch.device("cpu")).program.steps)
    assert made == [1] * n_steps + [3] * n_steps
    x = torch.randn(1, 3, 16)
    with torch.no_grad(), moec.disabled():
        want = eager(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_a_weight_restrided_at_the_same_address_is_bound_again():
    """``p.data = p.data.t()`` keeps the tensor and its address but swaps its strides (a square weight): the
    binding made for the old strides must not serve the next call."""
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE(d=16, f=16).eval())
    twin = copy.deepcopy(model)
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        model(x)
        for net in (model, twin):
            p = net.experts[1].w1.weight
            address = p.data_ptr()
            p.data = p.data.t()
            assert p.data_ptr() == address
        got = model(x)
        with moec.disabled():
            want = twin(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert _region(model).calls["kernels"] == 2


def test_a_selection_bias_read_in_fp32_sees_in_place_writes():
    """An fp16 layer's fp16 selection bias is read in fp32 (a copy made per call, never bound): an in-place
    update between calls (DeepSeek's load balancing) changes the routing as it does in eager."""
    torch.manual_seed(0)
    model = moec.compile(zoo.DeepseekV3MoE().half().eval())
    twin = copy.deepcopy(model)
    x = torch.randn(1, 6, 16).half()
    with torch.no_grad():
        model(x)
        for net in (model, twin):
            assert net.gate.e_score_correction_bias.dtype == torch.float16
            net.gate.e_score_correction_bias[5] += 4.0     # expert 5's group wins, and expert 5 with it
        got = model(x)
        with moec.disabled():
            want = twin(x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert _region(model).calls["kernels"] == 2


def test_bind_checks_the_weights_it_binds():
    """A bound weight of the wrong shape is refused when bound (naming it), not at some later launch."""
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().eval())
    region, c = _compiled(model, torch.randn(3, 16))
    inputs = moe_inputs(torch.randn(3, 16), region.weights(region.tensors(model)))
    inputs["w_down"] = inputs["w_down"][:, :, :-1]
    with pytest.raises(ValueError, match="w must be"):
        c.program.bind(inputs).run({"x": torch.randn(3, 16)})
