"""Weight gradients land in the parameters' own layout: the backward's kernels write each weight's gradient into
a view of a buffer laid out like the parameter (a stacked buffer for ModuleList experts, the two halves or the
interleaved columns of a fused ``gate_up``, a transposed expert tensor), and that buffer becomes ``.grad``
(added to an existing one by autograd, so hooks and gradient accumulation behave as for any gradient): no
stacking, slicing or scattering of gradients after the kernels. Checked against eager copies.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moec
import moec.moe_backward as moe_backward
import zoo
from moec.frontend.lifted import Src, WeightsRecipe
from test_backward import _assert_same_grads, _loss

# what autograd of a weight binding would run to map gradients back onto the parameters
_REGATHER = {"aten::stack", "aten::cat", "aten::slice_backward", "aten::unbind", "aten::index_put",
             "aten::select_backward", "aten::as_strided_scatter", "aten::slice_scatter"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _twins(name, seed=0):
    torch.manual_seed(seed)
    eager = getattr(zoo, name)().train()
    return moec.compile(copy.deepcopy(eager)), eager


@pytest.mark.parametrize("name", ["MixtralMoE", "StackedExpertsModuleMoE", "BiasedFusedExpertMoE", "QwenMoE",
                                  "StackedGatherBmmMoE", "DeepseekV3MoE"])
def test_weight_gradients_are_written_in_the_parameters_layout(name):
    compiled, eager = _twins(name)
    x = torch.randn(2, 5, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = _loss(compiled(xa))
    with _Ops() as ops:
        loss.backward()
    _loss(eager(xb)).backward()
    _assert_same_grads(compiled, eager, xa, xb)
    assert not (set(ops.seen) & _REGATHER), sorted(set(ops.seen) & _REGATHER)
    for n, p in compiled.named_parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape and p.grad.stride() == p.stride(), n


def test_modulelist_experts_get_views_of_one_stacked_gradient():
    """As their weights are views of one stacked storage (`share_storage`), their gradients are views of one
    stacked gradient, which the kernels wrote in one pass."""
    compiled, eager = _twins("MixtralMoE")
    compiled(torch.randn(6, 16, requires_grad=True)).sum().backward()
    w1 = [e.w1.weight.grad for e in compiled.experts]
    assert len({g.untyped_storage().data_ptr() for g in w1}) == 1
    assert [g.storage_offset() for g in w1] == [i * w1[0].numel() for i in range(len(w1))]


def test_gradients_accumulate_and_parameter_hooks_run():
    compiled, eager = _twins("QwenMoE", seed=2)
    seen = []
    p = next(compiled.experts[1].parameters())
    p.register_hook(lambda g: seen.append("grad hook") or g)
    p.register_post_accumulate_grad_hook(lambda t: seen.append("post accumulate"))
    xs = [torch.randn(1, 3, 16) for _ in range(2)]
    for m in (compiled, eager):
        for x in xs:
            y, _ = m(x)
            y.square().sum().backward()
    assert seen == ["grad hook", "post accumulate"] * 2
    for (n, a), b in zip(compiled.named_parameters(), eager.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_the_autograd_path_serves_a_binding_that_does_not_partition_its_tensor(monkeypatch):
    """A tensor two fields read overlapping parts of (or any the layout cannot prove) keeps the autograd
    mapping of the binding; gradients equal eager either way."""
    monkeypatch.setattr(moe_backward, "_partitions", lambda recipe, i, shapes: False)
    compiled, eager = _twins("BiasedFusedExpertMoE")
    x = torch.randn(2, 5, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    _loss(compiled(xa)).backward()
    _loss(eager(xb)).backward()
    _assert_same_grads(compiled, eager, xa, xb)


def test_partitions_reads_the_slices():
    shapes = [(4, 16, 8)]
    halves = WeightsRecipe((("w_gate", Src((0,), rows=(0, 8, 1))), ("w_up", Src((0,), rows=(8, 16, 1)))))
    interleaved = WeightsRecipe((("w_gate", Src((0,), cols=(0, 8, 2))), ("w_up", Src((0,), cols=(1, 8, 2)))))
    overlap = WeightsRecipe((("w_gate", Src((0,), rows=(0, 9, 1))), ("w_up", Src((0,), rows=(7, 16, 1)))))
    gap = WeightsRecipe((("w_gate", Src((0,), rows=(0, 8, 1))), ("w_up", Src((0,), rows=(9, 16, 1)))))
    tied = WeightsRecipe((("w_gate", Src((0,))), ("w_up", Src((0,)))))
    mixed = WeightsRecipe((("w_gate", Src((0,), rows=(0, 8, 1))), ("w_up", Src((0,), transpose=True, rows=(0, 4, 1)))))
    assert halves.partitions(0, shapes) and interleaved.partitions(0, shapes)
    assert not any(r.partitions(0, shapes) for r in (overlap, gap, tied, mixed))
    stacked = WeightsRecipe((("w_up", Src((0, 1, 2), stack=True)),))
    assert all(stacked.partitions(i, [(16, 8)] * 3) for i in range(3))


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_experts_interface_gradients_in_the_modules_layout(name):
    """transformers' experts (fused gate_up; GPT-OSS: transposed, interleaved columns, biases): each gradient is
    a buffer laid out like its parameter, equal to eager's."""
    import hf_models as H
    assert moec.hf.register()
    experts = [next(m for m in H.build(name, experts_implementation=impl).train().modules()
                    if type(m).__name__.endswith("Experts")) for impl in ("eager", "moec")]
    g = torch.Generator().manual_seed(6)
    E = experts[0].num_experts
    x = torch.randn(7, experts[0].down_proj.shape[1 if name == "mixtral" else 2], generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(7)])
    wts = torch.rand(7, 2, generator=g)
    grads = []
    for m in experts:
        xs, ws = x.clone().requires_grad_(), wts.clone().requires_grad_()
        loss = (m(xs, ids, ws) * torch.linspace(-1, 1, x.numel()).view(x.shape)).sum()
        with _Ops() as ops:
            loss.backward()
        grads.append((xs.grad, ws.grad, {n: p.grad for n, p in m.named_parameters()}))
    assert moec.hf.calls(experts[1])["backward: kernels"] == 1
    assert not (set(ops.seen) & _REGATHER), ops.seen
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)
    for n, p in experts[1].named_parameters():
        torch.testing.assert_close(grads[1][2][n], grads[0][2][n], rtol=1e-4, atol=1e-5, msg=n)
        assert grads[1][2][n].stride() == p.stride(), n
    assert len(grads[1][2]) >= (4 if name == "gpt_oss" else 2)
