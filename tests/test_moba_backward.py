"""MoBA's generated backward (`moec.runtime.moba_backward_kernel`, `moec.ir.backward.build_moba_backward_graph`):
d q, d k, d v against autograd of the reference attention over the same blocks (GQA, packed sequences,
partial last blocks, rows with no key, the lse output's gradient, fp32 and fp16), through
`moec.ops.moba_attention` (both forward schemes, under ``torch.compile`` too), with no ATen matmul in its
backward; its IR verifies, prints and parses back, and its kernels compile ahead of time per arch."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import moec
from aot_util import aot_archs, distinct_launches, record_launches, retyped
from moec.compiler import BackwardRecipe, MobaRecipe, compile_program
from moec.ir import parse_graph, print_graph, verify
from moec.ir.backward import build_moba_backward_graph
from moec.ir.interp import interpret
from moec.ir.tiles import MobaAttentionTile
from moec.moba import reference as R
from moec.moba.config import MobaConfig
from moec.runtime.aot import compile_launch
from moec.runtime.arch import ARCHS
from moec.runtime.moba_backward_kernel import attention_delta, moba_dkdv, moba_dq

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "large"


def _inputs(B, H, Hkv, N, D, dtype, seed, lens=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))
    cu = None
    if lens is not None:
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, g


def _eager_grads(q, k, v, idx, cu, bs, d_out, d_lse):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, lse = R.moba_attention_from_indices(*leaves, idx, block_size=bs, cu_seqlens=cu)
    loss = (out * d_out.float()).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse).sum()
    if loss.requires_grad:
        loss.backward()
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves], out.detach(), lse.detach()


@given(B=st.integers(1, 2), H=st.sampled_from([2, 4]), group=st.sampled_from([1, 2]), N=st.integers(1, 70),
       D=st.sampled_from([16, 32]), bs=st.sampled_from([16, 32]), top_k=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
@example(B=1, H=2, group=2, N=1, D=16, bs=16, top_k=2, dtype=torch.float32, seed=0)
@example(B=2, H=4, group=2, N=65, D=16, bs=16, top_k=3, dtype=torch.float16, seed=1)
def test_kernels_match_autograd(B, H, group, N, D, bs, top_k, dtype, seed):
    q, k, v, cu, g = _inputs(B, H, H // group, N, D, dtype, seed)
    idx = R.moba_block_selection(q, k, block_size=bs, top_k=top_k).to(torch.int32)
    d_out = torch.randn(B, H, N, D, generator=g).to(dtype)
    d_lse = torch.randn(B, H, N, generator=g)
    want, out, lse = _eager_grads(q, k, v, idx, cu, bs, d_out, d_lse)
    delta = attention_delta(out.to(dtype), d_out, d_lse)
    tile = MobaAttentionTile(16, 16)
    dq = moba_dq(q, k, v, idx, d_out, lse, delta, block_size=bs, tile=tile)
    dk, dv = moba_dkdv(q, k, v, idx, d_out, lse, delta, block_size=bs, tile=tile)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, got, w in zip("qkv", (dq, dk, dv), want):
        scale = max(w.abs().max().item() if w.numel() else 0.0, 1.0)
        torch.testing.assert_close(got.float(), w, rtol=tol, atol=tol * scale, msg=f"d{name}")


@pytest.mark.parametrize("lens", [(13, 37, 27), (1, 16, 33), (40,)])
def test_packed_sequences(lens):
    q, k, v, cu, g = _inputs(1, 4, 2, sum(lens), 16, torch.float32, 3, lens)
    idx = R.moba_block_selection(q, k, block_size=16, top_k=3, cu_seqlens=cu).to(torch.int32)
    d_out, d_lse = torch.randn(q.shape, generator=g), torch.randn(q.shape[:3], generator=g)
    want, out, lse = _eager_grads(q, k, v, idx, cu, 16, d_out, d_lse)
    delta = attention_delta(out, d_out, d_lse)
    tile = MobaAttentionTile(16, 16)
    dq = moba_dq(q, k, v, idx, d_out, lse, delta, block_size=16, tile=tile, cu_seqlens=cu)
    dk, dv = moba_dkdv(q, k, v, idx, d_out, lse, delta, block_size=16, tile=tile, cu_seqlens=cu)
    for name, got, w in zip("qkv", (dq, dk, dv), want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4, msg=f"d{name}")


def test_rows_without_keys_and_unselected_own_blocks():
    """Indices that leave a row's own block out, or list nothing: such rows get no gradient, as eager."""
    q, k, v, _, g = _inputs(1, 2, 2, 48, 16, torch.float32, 5)
    idx = R.moba_block_selection(q, k, block_size=16, top_k=2).to(torch.int32)
    idx[0, 0, 20:24] = -1                                   # no key at all: lse -inf
    idx[0, 1, 40:44, 0] = 0                                 # own block left out: past block 0 only
    idx[0, 1, 40:44, 1] = -1
    d_out, d_lse = torch.randn(q.shape, generator=g), torch.randn(q.shape[:3], generator=g)
    want, out, lse = _eager_grads(q, k, v, idx, None, 16, d_out, d_lse)
    assert torch.isinf(lse[0, 0, 20:24]).all()
    delta = attention_delta(out, d_out, d_lse)
    tile = MobaAttentionTile(16, 16)
    dq = moba_dq(q, k, v, idx, d_out, lse, delta, block_size=16, tile=tile)
    dk, dv = moba_dkdv(q, k, v, idx, d_out, lse, delta, block_size=16, tile=tile)
    for name, got, w in zip("qkv", (dq, dk, dv), want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4, msg=f"d{name}")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheme", ["rows", "densify"])
@pytest.mark.parametrize("packed", [False, True])
def test_op_backward_is_generated_kernels(scheme, packed):
    lens = (20, 45, 25) if packed else None
    B = 1 if packed else 2
    q, k, v, cu, g = _inputs(B, 4, 2, 90, 16, torch.float32, 7, lens)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = moec.ops.moba_attention(*leaves, block_size=16, top_k=3, cu_seqlens=cu, return_lse=True,
                                       scheme=scheme)
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    loss = (out * d_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse).sum()
    with _Ops() as seen:
        loss.backward()
    assert "moec::moba_attention_backward" in seen.ops
    assert not {"aten::mm", "aten::bmm", "aten::addmm", "aten::matmul"} & set(seen.ops)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o2, l2 = R.moba_reference(*ref, block_size=16, top_k=3, cu_seqlens=cu)
    ((o2 * d_out).sum() + (torch.where(torch.isinf(l2), 0.0, l2) * d_lse).sum()).backward()
    for name, a, b in zip("qkv", leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=f"d{name}")


def test_op_trains_under_torch_compile():
    q, k, v, _, g = _inputs(1, 2, 2, 40, 16, torch.float32, 9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step(q, k, v):
        return moec.ops.moba_attention(q, k, v, block_size=16, top_k=2).square().mean()

    torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    step(*ref).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_backward_ir_verifies_round_trips_and_interprets_as_the_kernels():
    cfg = MobaConfig(16, 3, 4, 2, 16)
    g = verify(build_moba_backward_graph(cfg, torch.float32, varlen=True))
    text = print_graph(g)
    assert print_graph(parse_graph(text)) == text
    assert [n.op for n in g.nodes] == ["attention_delta", "block_sparse_attention_dq", "block_sparse_attention_dkdv"]
    c = compile_program(BackwardRecipe(MobaRecipe(cfg, varlen=True)), torch.float32, ARCHS["cpu"])
    q, k, v, cu, gen = _inputs(1, 4, 2, 60, 16, torch.float32, 11, (25, 35))
    idx = R.moba_block_selection(q, k, block_size=16, top_k=3, cu_seqlens=cu).to(torch.int32)
    out, lse = R.moba_attention_from_indices(q, k, v, idx, block_size=16, cu_seqlens=cu)
    inputs = {"q": q, "k": k, "v": v, "cu_seqlens": cu, "indices": idx, "out": out, "lse": lse,
              "d_out": torch.randn(q.shape, generator=gen), "d_lse": torch.randn(lse.shape, generator=gen)}
    for a, b in zip(c.program.run(inputs), interpret(c.graph, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", aot_archs("sm90"))
def test_backward_kernels_compile_and_fit(arch):
    """At the tiles chosen for each arch (64-row tiles: wgmma on sm90, tcgen05 on sm100), bf16 (and fp16 as
    recorded under ``HYPOTHESIS_PROFILE=large``)."""
    cfg = MobaConfig(64, 3, 4, 2, 64)
    for varlen in (False, True):
        c = compile_program(BackwardRecipe(MobaRecipe(cfg, varlen=varlen)), torch.float16, ARCHS[arch])
        q, k, v, cu, gen = _inputs(1, 4, 2, 200, 64, torch.float16, 13, (90, 110) if varlen else None)
        idx = R.moba_block_selection(q, k, block_size=64, top_k=3, cu_seqlens=cu).to(torch.int32)
        out, lse = R.moba_attention_from_indices(q, k, v, idx, block_size=64, cu_seqlens=cu)
        inputs = {"q": q, "k": k, "v": v, "cu_seqlens": cu, "indices": idx, "out": out, "lse": lse,
                  "d_out": torch.randn(q.shape, generator=gen).half(), "d_lse": torch.zeros(lse.shape)}
        records = record_launches(lambda: c.program.run({n: t for n, t in inputs.items() if t is not None}))
        for rec in distinct_launches(records):
            for r in (retyped(rec, "fp16", "bf16"),) + ((rec,) if LARGE else ()):
                report = compile_launch(r, arch)
                assert report.fits, f"{r.kernel.fn_name} {arch}: {report.shared} > {report.smem_limit}"
                assert report.mma == {"sm80": "mma.sync", "sm90": "wgmma", "sm100": "tcgen05"}[arch], \
                    f"{r.kernel.fn_name} {arch}: {report.mma!r}"


def test_backward_tiles_fit_every_arch_head_dim_and_dtype():
    """The backward's table tiles are shrunk to the arch's shared memory for the head dim and element size
    (fp32: 4 bytes); the worst case before shrinking (sm86's 99 KB, head dim 256, bf16) compiles and fits."""
    from moec.passes.moba_tiles import _DKDV, backward_smem, dkdv_tile, dq_tile
    for arch in _DKDV:
        for D in (64, 128, 256):
            for size in (2, 4):
                for fn in (dq_tile, dkdv_tile):
                    tile = fn(128, D, arch, size)
                    assert backward_smem(tile, D, size) <= 0.8 * ARCHS[arch].smem_per_block, (arch, D, size, tile)
    cfg = MobaConfig(128, 3, 2, 1, 256)
    c = compile_program(BackwardRecipe(MobaRecipe(cfg)), torch.float16, ARCHS["sm86"])
    q, k, v, _, gen = _inputs(1, 2, 1, 131, 256, torch.float16, 17)
    idx = R.moba_block_selection(q, k, block_size=128, top_k=3).to(torch.int32)
    out, lse = R.moba_attention_from_indices(q, k, v, idx, block_size=128)
    inputs = {"q": q, "k": k, "v": v, "indices": idx, "out": out, "lse": lse,
              "d_out": torch.randn(q.shape, generator=gen).half(), "d_lse": torch.zeros(lse.shape)}
    for rec in distinct_launches(record_launches(lambda: c.program.run(inputs))):
        report = compile_launch(retyped(rec, "fp16", "bf16"), "sm86")
        assert report.fits, f"{rec.kernel.fn_name}: {report.shared} > {report.smem_limit}"


def test_fake_outputs_are_contiguous_like_the_kernels():
    """torch.compile's graphs assume the fake implementations' strides: q, k, v as strided views of
    [B, N, H, D] tensors give contiguous outputs in both the op and its fake, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = (t.transpose(1, 2) for t in (torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16),
                                             torch.randn(1, 40, 2, 16)))
    real = torch.ops.moec.moba_attention(q, k, v, None, None, 16, 2, True, "auto")
    grads = torch.ops.moec.moba_attention_backward(q, k, v, None, real[2], real[0], real[1], torch.ones_like(real[0]),
                                                   torch.zeros_like(real[1]), 16, 2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.moec.moba_attention(fq, fk, fv, None, None, 16, 2, True, "auto")
        fgrads = torch.ops.moec.moba_attention_backward(fq, fk, fv, None, fake[2], fake[0], fake[1],
                                                        torch.ones_like(fake[0]), torch.zeros_like(fake[1]), 16, 2)
    for a, b in zip((*real, *grads), (*fake, *fgrads)):
        assert a.shape == b.shape and a.stride() == b.stride(), (a.stride(), b.stride())


def test_a_loss_on_lse_alone_leaves_v_without_gradient():
    q, k, v, _, g = _inputs(1, 2, 2, 40, 16, torch.float32, 19)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, lse = moec.ops.moba_attention(*leaves, block_size=16, top_k=2, return_lse=True)
    torch.where(torch.isinf(lse), 0.0, lse).sum().backward()
    assert leaves[2].grad is None and leaves[0].grad is not None and leaves[1].grad is not None


def test_packed_sequences_train_under_torch_compile_and_bad_values_still_raise():
    """The public wrapper reads cu_seqlens' values only outside a trace; the op checks them when it runs."""
    q, k, v, cu, _ = _inputs(1, 2, 1, 30, 16, torch.float32, 21, (5, 0, 25))

    def step(q, k, v, cu):
        out, lse = moec.ops.moba_attention(q, k, v, block_size=8, top_k=2, cu_seqlens=cu, return_lse=True)
        return out.square().mean() + torch.where(torch.isinf(lse), 0.0, lse).mean()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*leaves, cu).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    step(*ref, cu).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        compiled(*leaves, torch.tensor([0, 40, 30], dtype=torch.int32))
