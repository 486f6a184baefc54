"""`moec.moba.moba_attention` (``torch.ops.moec.moba_attention``): kernels vs the eager reference,
the eager fallbacks, autograd, and torch.compile."""
from __future__ import annotations

import pytest
import torch

from moec.moba import moba_reference
from moec.ops import kernels_apply, moba_attention
from moec.runtime.launch import recording

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def inputs(dtype=torch.float32, B=1, H=4, Hkv=2, N=70, D=32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g).to(dtype).requires_grad_(requires_grad) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("varlen", [False, True])
def test_op_matches_reference(dtype, varlen):
    q, k, v = inputs(dtype)
    cu = torch.tensor([0, 20, 70], dtype=torch.int32) if varlen else None
    w = torch.randn(2, 32, 3) * 0.3
    with recording() as launches:
        out, lse = moba_attention(q, k, v, block_size=16, top_k=3, cu_seqlens=cu, kconv_weight=w, return_lse=True)
    assert {r.kernel.fn_name.split("_bs")[0] for r in launches} == {"moec_moba_gate", "moec_moba_attention"}
    r_out, r_lse = moba_reference(q, k, v, block_size=16, top_k=3, cu_seqlens=cu, kconv_weight=w)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, r_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, r_lse, rtol=1e-4, atol=1e-4)
    assert moba_attention(q, k, v, block_size=16, top_k=3, cu_seqlens=cu, kconv_weight=w).shape == q.shape


def test_strided_inputs_bshd_layout():
    """[B, N, H, D] tensors passed as .transpose(1, 2) views: no copy needed, same result."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 40, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    out = moba_attention(q, k, v, block_size=8, top_k=3)
    torch.testing.assert_close(out, moba_reference(q.contiguous(), k.contiguous(), v.contiguous(), block_size=8,
                                                   top_k=3)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_eager_fallback(dtype):
    q, k, v = inputs(dtype, N=40)
    assert not kernels_apply(q, k, v)
    with recording() as launches:
        out, lse = moba_attention(q, k, v, block_size=16, top_k=2, return_lse=True)
    assert not launches
    r_out, r_lse = moba_reference(q, k, v, block_size=16, top_k=2)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(lse, r_lse)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_mixed_dtypes_are_an_error_naming_the_argument():
    q, k, v = inputs(torch.float32, N=20)
    assert not kernels_apply(q, k.half(), v)
    with recording() as launches, pytest.raises(TypeError, match="k has dtype torch.float16, q torch.float32"):
        moba_attention(q, k.half(), v, block_size=8, top_k=2)
    assert not launches


def test_gradients_match_reference():
    """Backward: the eager dense attention over the forward's own selection, under autograd."""
    q, k, v = inputs(torch.float32, N=40, requires_grad=True)
    out, lse = moba_attention(q, k, v, block_size=8, top_k=3, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    r_out, r_lse = moba_reference(q2, k2, v2, block_size=8, top_k=3)
    (r_out.square().sum() + r_lse.sum()).backward()
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # only some inputs need a gradient; out only
    q3 = q.detach().clone().requires_grad_()
    moba_attention(q3, k.detach(), v.detach(), block_size=8, top_k=3).sum().backward()
    assert q3.grad is not None and torch.isfinite(q3.grad).all()


def test_torch_compile_sees_one_op():
    q, k, v = inputs(torch.float32, N=24)

    def layer(q, k, v):
        return moba_attention(q, k, v, block_size=8, top_k=2) * 2 + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
    gm = torch.fx.symbolic_trace(lambda q, k, v: torch.ops.moec.moba_attention(q, k, v, None, None, 8, 2, True))
    assert any("moba_attention" in str(n.target) for n in gm.graph.nodes)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k = torch.empty(2, 4, 10, 8), torch.empty(2, 2, 10, 8)
        out, lse, idx = torch.ops.moec.moba_attention(q, k, k, None, None, 4, 3, True)
    assert out.shape == (2, 4, 10, 8) and lse.shape == (2, 4, 10) and idx.shape == (2, 4, 10, 3)
    assert lse.dtype == torch.float32 and idx.dtype == torch.int32


def test_rejects_bad_arguments():
    q, k, v = inputs(N=10)
    with pytest.raises(NotImplementedError):
        moba_attention(q, k, v, block_size=4, top_k=2, causal=False)
    with pytest.raises(ValueError, match="top_k"):
        moba_attention(q, k, v, block_size=4, top_k=0)
    with pytest.raises(ValueError, match="multiple"):
        moba_attention(q[:, :3], k, v, block_size=4, top_k=2)


@pytest.mark.parametrize("scheme", ["rows", "densify"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_infinite_keys_give_the_references_nan_and_inf(scheme):
    """A row with a +inf score gets out NaN and lse +inf (as torch.softmax / torch.logsumexp), in the
    reference and in both attention schemes; -inf keys and the other rows are unaffected."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 90, 16, generator=g) for h in (2, 2, 2))
    k[0, 0, 5, 3], k[0, 1, 40, 0] = float("inf"), float("-inf")
    out, lse = moba_attention(q, k, v, block_size=8, top_k=3, return_lse=True, scheme=scheme)
    r_out, r_lse = moba_reference(q, k, v, block_size=8, top_k=3)
    assert r_out.isnan().any() and (r_lse == float("inf")).any()
    torch.testing.assert_close(out, r_out, equal_nan=True, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, equal_nan=True, rtol=1e-4, atol=1e-4)
