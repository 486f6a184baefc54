"""`moec.ops.moe`: the fused layer as a torch.library op, vs its eager reference."""
import pytest
import torch

import moec
from moec.spec import MoESpecError


def weights(E=4, d=16, f=24, fs=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)
    w = dict(w_router=r(E, d), w_up=r(E, f, d), w_down=r(E, d, f), w_gate=r(E, f, d))
    if fs:
        w.update(shared_up=r(fs, d), shared_down=r(d, fs), shared_gate=r(fs, d), shared_gate_proj=r(1, d))
    return w


@pytest.mark.parametrize("options", [
    dict(top_k=2),
    dict(top_k=2, renormalize=True),
    dict(top_k=1),
    dict(top_k=2, score="sigmoid", renormalize=True, routed_scaling=2.5, n_group=2, topk_group=1,
         group_score="top2_sum"),
    dict(top_k=2, score="sqrtsoftplus", renormalize=True, routed_scaling=1.5),     # DeepSeek-V4's scores
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_op_matches_reference(options, dtype):
    w = weights(dtype=dtype, fs=8 if options["top_k"] == 2 else 0)
    if "score" in options:
        options = {**options, "score_bias": torch.randn(4) * 0.1}
    x = torch.randn(2, 5, 16).to(dtype)
    y = moec.ops.moe(x, **w, **options)
    ref = moec.ops.moe_reference(x, **w, **options)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_op_gpt_oss_experts(dtype):
    """GPT-OSS's experts through the op: interleaved gate/up views, biases, clamped SwiGLU; with gradients."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype).requires_grad_()   # noqa: E731
    gate_up, gate_up_bias, down, down_bias, router = r(4, 16, 48), r(4, 48), r(4, 24, 16), r(4, 16), r(4, 16)
    w = dict(w_router=router, w_gate=gate_up[..., 0::2].mT, w_up=gate_up[..., 1::2].mT, w_down=down.mT,
             b_gate=gate_up_bias[:, 0::2], b_up=gate_up_bias[:, 1::2], b_down=down_bias,
             b_router=r(4), top_k=2, renormalize=True, act_alpha=1.702, glu_limit=0.7, up_shift=1.0)
    x = (torch.randn(7, 16, generator=g) * 2).to(dtype).requires_grad_()
    y = moec.ops.moe(x, **w)
    want = moec.ops.moe_reference(x, **w)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    if dtype == torch.float32:
        leaves = [x, router, gate_up, gate_up_bias, down, down_bias]
        got = torch.autograd.grad(y.square().sum(), leaves)
        ref = torch.autograd.grad(want.square().sum(), leaves)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="b_gate"):
        moec.ops.moe(x, **{**w, "b_gate": None})


def test_moe_op_empty_and_non_gated():
    w = weights()
    w.pop("w_gate")
    for T in (0, 1):
        x = torch.randn(T, 16)
        y = moec.ops.moe(x, **w, top_k=2, activation="gelu")
        torch.testing.assert_close(y, moec.ops.moe_reference(x, **w, top_k=2, activation="gelu"))


def test_moe_op_gradients():
    w = {k: v.requires_grad_() for k, v in weights().items()}
    x = torch.randn(6, 16, requires_grad=True)
    moec.ops.moe(x, **w, top_k=2, renormalize=True).square().sum().backward()
    got = [x.grad] + [t.grad for t in w.values()]
    w2 = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
    x2 = x.detach().clone().requires_grad_()
    moec.ops.moe_reference(x2, **w2, top_k=2, renormalize=True).square().sum().backward()
    for a, b in zip(got, [x2.grad] + [t.grad for t in w2.values()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_compile_sees_one_op():
    w = weights()

    def layer(x):
        return torch.relu(moec.ops.moe(x, **w, top_k=2)) + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(compiled(x), layer(x))
    gm = torch.fx.symbolic_trace(lambda x: torch.ops.moec.moe(x, *[None] * 13, 2, "softmax", False, 1.0, 1, 1, "max",
                                                              "silu", 1.0, None, 0.0))
    assert any(n.target is torch.ops.moec.moe.default or "moec.moe" in str(n.target) for n in gm.graph.nodes)


def test_moe_op_bad_input():
    w = weights()
    with pytest.raises(MoESpecError, match="top_k"):
        moec.ops.moe(torch.randn(3, 16), **w, top_k=5)
    with pytest.raises(ValueError, match="hidden size"):
        moec.ops.moe(torch.randn(3, 15), **w, top_k=2)
    bad = dict(w, w_down=w["w_down"][:, :, :5])
    with pytest.raises(ValueError, match=r"w_down must have shape \[4, 16, 24\]"):
        moec.ops.moe(torch.randn(3, 16), **bad, top_k=2)
    x64 = torch.randn(3, 16, dtype=torch.float64)             # no kernel: the eager reference answers
    w64 = {k: v.double() for k, v in w.items()}
    torch.testing.assert_close(moec.ops.moe(x64, **w64, top_k=2), moec.ops.moe_reference(x64, **w64, top_k=2))


class _CountBackwardOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shared", [False, True])
def test_moe_op_backward_is_generated_kernels(shared):
    """The op's registered backward is ``moec::moe_backward`` (generated kernels; the router's matmuls
    only), and its gradients match the reference's, shared expert and expert biases included."""
    w = weights(fs=20 if shared else 0)
    E, f, d = w["w_up"].shape[0], w["w_up"].shape[1], 16
    g = torch.Generator().manual_seed(4)
    extra = {"b_gate": torch.randn(E, f, generator=g), "b_up": torch.randn(E, f, generator=g),
             "b_down": torch.randn(E, d, generator=g)} if not shared else {}
    w = {k: v.clone().requires_grad_() for k, v in {**w, **extra}.items()}
    x = torch.randn(9, d, requires_grad=True)
    y = moec.ops.moe(x, **w, top_k=2, renormalize=True)
    with _CountBackwardOps() as seen:
        y.square().sum().backward()
    assert "moec::moe_backward" in seen.ops
    assert sum(op in ("aten::mm", "aten::addmm", "aten::bmm") for op in seen.ops) <= 4
    w2 = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
    x2 = x.detach().clone().requires_grad_()
    moec.ops.moe_reference(x2, **w2, top_k=2, renormalize=True).square().sum().backward()
    for (name, a), b in zip([("x", x)] + list(w.items()), [x2] + list(w2.values())):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_moe_op_trains_under_torch_compile():
    """A training step compiled whole (forward and backward graphs) with the op inside."""
    w = {k: v.clone().requires_grad_() for k, v in weights().items()}
    x = torch.randn(7, 16)

    def step(x):
        return moec.ops.moe(x, **w, top_k=2).square().mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(x).backward()
    got = {k: v.grad.clone() for k, v in w.items()}
    for v in w.values():
        v.grad = None
    step(x).backward()
    for k, v in w.items():
        torch.testing.assert_close(got[k], v.grad, rtol=1e-5, atol=1e-6, msg=k)
