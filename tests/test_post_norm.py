"""A norm the block applies to its combined output (A.X-K1's ``post_mlp_layernorm``): the layer is lifted,
the kernels compute the MoE and the block's own norm module runs on their output; forward, gradients
(the norm's too), guards and hooks behave as eager's. A norm of the *input* is not that, and stays eager."""
from __future__ import annotations

import copy

import torch

import moec
import zoo


def _pair(cls, seed=0):
    torch.manual_seed(seed)
    eager = cls()
    return moec.compile(copy.deepcopy(eager)), eager


def _region(model):
    return model.__dict__["_moec_region"]


def test_post_norm_is_lifted_and_equals_eager():
    model, eager = _pair(zoo.PostNormMoE)
    region = _region(model)
    assert region.lifted is not None and region.lifted.post == "out_norm"
    assert "output norm: out_norm (RMSNorm)" in model.explain()
    for T in (1, 7):
        x = torch.randn(2, T, 16)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outs = [net(xi) for net, xi in zip((model, eager), xs)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        for o in outs:
            o.square().sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
        for (n, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
            assert (a.grad is None) == (b.grad is None), n
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
        model.zero_grad(), eager.zero_grad()
    assert region.calls["kernels forward and backward"] == 2


def test_post_norm_changes_are_seen():
    """The norm's scale written in place, its eps changed (a guarded attribute: lifted again), a hook on it
    (the layer runs eager for that call): each call equals eager's."""
    model, eager = _pair(zoo.PostNormMoE)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        for net in (model, eager):
            net.out_norm.weight.mul_(-2.0)
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)
        for net in (model, eager):
            net.out_norm.eps = 0.5
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)
        hooks = [net.out_norm.register_forward_hook(lambda m, a, out: out * 3.0) for net in (model, eager)]
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)
        for h in hooks:
            h.remove()
    assert any("eps" in what for what in _region(model).guard_changes)
    assert any("forward hooks on out_norm" in what for what in _region(model).calls)


def test_a_norm_of_the_input_stays_eager_and_says_so():
    model, eager = _pair(zoo.PreNormMoE)
    assert _region(model).lifted is None if "_moec_region" in model.__dict__ else True
    line = next(ln for ln in model.explain().splitlines() if ln.strip().startswith("EAGER"))
    assert "PreNormMoE" in line and "norm" in line, line
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))


class _FlatGroupNormMoE(zoo.MixtralMoE):
    """A norm over channels of the flat rows (``GroupNorm`` on ``[T, d]``, then reshaped back): not row-wise
    as the kernels' output is shaped, so it must not be taken as an output norm."""

    def __init__(self):
        super().__init__()
        self.out_norm = torch.nn.GroupNorm(4, 16)

    def forward(self, x):
        y = super().forward(x)
        return self.out_norm(y.reshape(-1, 16)).reshape(y.shape)


def test_a_norm_over_other_dims_is_not_an_output_norm():
    model, eager = _pair(_FlatGroupNormMoE)
    region = model.__dict__.get("_moec_region")
    assert region is None or region.lifted is None or region.lifted.post is None
    with torch.no_grad():
        for shape in ((1, 16, 16), (2, 5, 16)):
            x = torch.randn(*shape)
            torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)
