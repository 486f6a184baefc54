"""Expert norms (Ergo): each pair's expert output RMS-normalised by its expert's own learned scale before the
weighted sum (``MoESpec.expert_norm``). Generated kernels run the routing, the expert GEMMs, the norm (which takes
the routing weights and the un-permute) and the top-k reduce; the backward recomputes the down projection's rows
for the norm's backward. Compared with eager copies made before compiling: outputs and every gradient."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moec
import zoo


def _pair(factory, seed: int = 0):
    torch.manual_seed(seed)
    eager = factory()
    return moec.compile(copy.deepcopy(eager)), eager


def _run(model, x, train: bool):
    model.train(train)
    xg = x.clone().requires_grad_()
    y = model(xg)
    (y.float().square() * torch.linspace(0.5, 1.5, y.numel()).view(y.shape)).sum().backward()
    return y.detach(), xg.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want, tol=1e-4):
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = got, want
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    for name, g in dw_ref.items():
        assert (dw[name] is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(dw[name], g, rtol=tol, atol=tol * max(1.0, g.abs().max().item()), msg=name)


@settings(deadline=None)
@given(E=st.sampled_from([4, 8]), k=st.integers(1, 3), B=st.integers(1, 3), S=st.integers(1, 9),
       eps=st.sampled_from([1e-6, 1e-5]), train=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_expert_norms_match_eager(E, k, B, S, eps, train, seed):
    """Any E, k, token count, eps (read off the module), both modes: outputs and the gradients of the input, the
    router, the experts, the norm scales and the external shared expert."""
    model, eager = _pair(lambda: zoo.ExpertNormMoE(E=E, k=k, eps=eps), seed % 13)
    report = model.explain()
    assert f"each output RMS-normalised by its expert's scale (eps={eps:g})" in report, report
    x = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(seed))
    _assert_same(_run(model, x, train), _run(eager, x, train))
    assert model._moec_region.calls["kernels forward and backward"] == 1


def test_the_forward_is_generated_kernels_only():
    """The norm's kernel takes the routing weights and the un-permute (fold-combine), the top-k reduce sums."""
    model, _ = _pair(zoo.ExpertNormMoE)
    with torch.no_grad():
        model(torch.randn(1, 4, 16))
    (c,) = model._moec_region.compiled.values()
    assert c.program.torch_steps() == []
    names = [k.fn_name for _, k in c.program.kernels()]
    assert names[0] == "moec_route_sigmoid_e8_k2" and "expert_norm_e8_scatter" in names and \
        names[-1].startswith("reduce_topk"), names


def test_fp16_forward_matches_eager():
    model, eager = _pair(lambda: zoo.ExpertNormMoE().half())
    x = torch.randn(2, 9, 16).half()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=3e-3, atol=3e-3)
    assert model._moec_region.calls["kernels"] == 1


def test_norm_scales_trained_and_written_are_read():
    model, eager = _pair(zoo.ExpertNormMoE)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager)]
    x = torch.randn(2, 6, 16)
    for _ in range(2):
        for m, opt in zip((model, eager), opts):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    with torch.no_grad():
        for m in (model, eager):
            m.expert_norm[1].mul_(-3.0)
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)
    assert model._moec_region.calls["kernels"] == 1


def test_a_norm_weight_of_another_shape_is_not_read_as_expert_norms():
    """An [E, d] tensor named *norm* that the forward does not apply per expert: the probe rejects the reading."""
    class Unused(zoo.NormedSharedMoE):
        def __init__(self):
            super().__init__()
            self.norm_stats = torch.nn.Parameter(torch.randn(8, 16))
    model, eager = _pair(Unused)
    assert "RMS-normalised" not in model.explain(), model.explain()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)


class LiteralEpsMoE(zoo.ExpertNormMoE):
    """The eps written into the forward (no attribute names it): only small expert outputs tell 1e-5 from 1e-6."""

    def __init__(self):
        super().__init__()
        del self.eps

    def forward(self, x):
        self.__dict__["eps"] = 1e-5
        try:
            return super().forward(x)
        finally:
            del self.__dict__["eps"]


def test_the_eps_is_confirmed_on_inputs_small_enough_to_show_it():
    model, eager = _pair(LiteralEpsMoE)
    assert "(eps=1e-05)" in model.explain(), model.explain()
    for scale in (1.0, 0.05, 0.01):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)) * scale
        with torch.no_grad():
            y, want = model(x), eager(x)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_fp16_norm_scales_written_after_the_first_call_are_read():
    """The fp16 scales are read in fp32 at every call (the bound program keeps no converted copy)."""
    model, eager = _pair(lambda: zoo.ExpertNormMoE().half())
    x = torch.randn(2, 7, 16).half()
    with torch.no_grad():
        model(x)
        for m in (model, eager):
            m.expert_norm[1:].mul_(-3.0)
        torch.testing.assert_close(model(x), eager(x), rtol=3e-3, atol=3e-3)
        model.load_state_dict(zoo.ExpertNormMoE().half().state_dict())
        eager.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), eager(x), rtol=3e-3, atol=3e-3)
    assert model._moec_region.calls["kernels"] >= 2


def test_fp16_normalised_rows_are_summed_unrounded():
    """Large scales: each row past fp16's range, their weighted sum within it (as eager sums in fp32)."""
    model, eager = _pair(lambda: zoo.ExpertNormMoE().half())
    with torch.no_grad():
        for m in (model, eager):
            m.expert_norm.fill_(24000.0)
        x = torch.randn(4, 16, 16).half()
        y, want = model(x), eager(x)
    assert torch.isfinite(want).all() and torch.isfinite(y).all()
    assert model._moec_region.calls["kernels"] == 1
