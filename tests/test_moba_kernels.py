"""The MoBA kernels under the Triton interpreter against the eager reference, piece by piece:
pooling (torch op), the fused gate + top-k (indices, tie tolerant), the block-sparse attention given
indices (any indices), and the three chained; plus the proof that the gate never materialises an
N x n_blocks score matrix."""
from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import pytest

from moec.ops import moba_forward_kernels
from moec.moba.reference import gate_scores, moba_attention_from_indices, moba_block_selection, pooled_keys
from moec.runtime.launch import recording
from moec.runtime.moba_attention_kernel import moba_attention_fwd
from moec.passes.moba_tiles import attention_tile, gate_tile
from moec.runtime.moba_maps import block_offsets, query_tile_map
from moec.runtime.moba_pool import pool_keys
from moec.runtime.moba_gate_kernel import moba_gate

# the interpreter evaluates in numpy: inf - inf / overflow warnings are expected there
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

GAP = {torch.float32: 1e-4, torch.float16: 1e-2}            # gate scores closer than this may swap
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}


# ----------------------------------------------------------------------------------------------
# problems

@st.composite
def problems(draw, max_n=100):
    """(B, H, Hkv, N, D, bs, top_k, cu_seqlens list or None, kconv width or None, dtype)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    hkv = draw(st.integers(1, 2))
    H = hkv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([16, 32, 24]))
    bs = draw(st.sampled_from([16, 32, 16, 12]))
    N = draw(st.integers(1, max_n))
    top_k = draw(st.integers(1, 8))
    cu = None
    B = draw(st.integers(1, 2))
    if B == 1 and draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, N), max_size=4)))
        cu = [0] + cuts + [N]
    kc = draw(st.sampled_from([None, None, 3, 5]))
    return B, H, hkv, N, D, bs, top_k, cu, kc, dtype


def make(problem, seed):
    B, H, hkv, N, D, bs, top_k, cu, kc, dtype = problem
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(dtype) for h in (H, hkv, hkv))
    w = torch.randn(hkv, D, kc, generator=g) * 0.5 if kc else None
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    return q, k, v, w, cu_t


def check_selection(idx, q, k, *, bs, top_k, cu, w, gap):
    """Kernel indices are a valid MoBA selection, equal to the reference's except where scores tie
    within ``gap``: ascending, own block last, -1 after, min(top_k, c+1) entries, and every selected
    past block scores at least (best unselected past block) - gap."""
    ref = moba_block_selection(q, k, block_size=bs, top_k=top_k, cu_seqlens=cu, kconv_weight=w)
    assert idx.shape == ref.shape and idx.dtype == torch.int32
    B, H, N, _ = q.shape
    segs = [(b, 0, N) for b in range(B)] if cu is None else [(0, a, e) for a, e in
                                                            zip(cu.tolist()[:-1], cu.tolist()[1:])]
    scores = gate_scores(q, k, block_size=bs, cu_seqlens=cu, kconv_weight=w)
    for (b, a, e), s in zip(segs, scores):
        L = e - a
        if L == 0:
            continue
        got, want = idx[b, :, a:e].long(), ref[b, :, a:e].long()
        nb = s.shape[-1]
        own = torch.arange(L) // bs
        count = torch.clamp(own + 1, max=top_k)
        slots = torch.arange(top_k)
        assert torch.equal(got < 0, (slots[None, :] >= count[:, None]).expand_as(got)), "wrong slot count"
        last = got.gather(-1, (count - 1).expand(H, L)[..., None])[..., 0]
        assert torch.equal(last, own.expand(H, L)), "own block not last"
        assert bool(((got[..., 1:] > got[..., :-1]) | (got[..., 1:] < 0)).all()), "not ascending"
        sel = torch.zeros(H, L, nb + 1, dtype=torch.bool).scatter_(-1, torch.where(got >= 0, got, nb), True)[..., :nb]
        past = torch.arange(nb)[None, :] < own[:, None]
        s = torch.nan_to_num(s.float(), nan=float("inf"))
        lo = torch.where(sel & past, s, float("inf")).amin(-1)
        hi = torch.where(~sel & past, s, float("-inf")).amax(-1)
        assert bool((lo >= hi - gap).all()), "a better block was left out"
        differs = (got != want).any(-1)
        if differs.any():          # only near-ties may differ
            top = torch.sort(torch.where(past, s, float("-inf")), -1, descending=True).values
            k1 = min(top_k - 1, nb)
            if k1 < nb:
                margin = top[..., k1 - 1] - top[..., k1] if k1 > 0 else torch.full_like(top[..., 0], float("inf"))
                assert bool((margin[differs] < gap).all()), "selection differs without a tie"


# ----------------------------------------------------------------------------------------------
# pooling

@pytest.mark.parametrize("kc", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pool_keys_matches_reference(kc, dtype):
    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 7, 40, 61], dtype=torch.int32)
    k = torch.randn(1, 2, 61, 8).to(dtype)
    w = torch.randn(2, 8, kc) if kc else None
    got = pool_keys(k, 16, cu, w)
    offs, nb_max = block_offsets(cu, 61, 16)
    assert got.shape == (1, 2, nb_max, 8) and got.dtype == dtype
    for s, (a, e) in enumerate(zip(cu.tolist()[:-1], cu.tolist()[1:])):
        want = pooled_keys(k[0, :, a:e], 16, w)
        o = int(offs[s])
        torch.testing.assert_close(got[0, :, o:o + want.shape[1]].float(), want.float(), **TOL[dtype])
    got = pool_keys(k, 16, None, w)
    torch.testing.assert_close(got[0].float(), pooled_keys(k[0], 16, w).float(), **TOL[dtype])


def test_query_tile_map_covers_every_row_once():
    cu = torch.tensor([0, 5, 5, 70, 71, 200], dtype=torch.int32)
    seq, local, n = query_tile_map(cu, 200, 32)
    assert n == 7 + 5
    starts = []
    for p in range(n):
        s = int(seq[p])
        if s >= 5:
            continue
        a, e = int(cu[s]), int(cu[s + 1])
        starts += list(range(a + int(local[p]) * 32, min(e, a + (int(local[p]) + 1) * 32)))
    assert sorted(starts) == list(range(200))


# ----------------------------------------------------------------------------------------------
# the gate

@given(problems(), st.integers(0, 2**31 - 1))
@example((1, 2, 1, 100, 16, 16, 1, None, None, torch.float32), 1)                 # top_k = 1
@example((2, 4, 2, 90, 32, 16, 8, None, 3, torch.float16), 2)                     # top_k > blocks, GQA, kconv
@example((1, 2, 2, 97, 24, 12, 3, [0, 5, 5, 60, 97], 5, torch.float32), 3)        # varlen, empty seq, bs 12
def test_gate_matches_reference(problem, seed):
    q, k, v, w, cu = make(problem, seed)
    bs, top_k, dtype = problem[5], problem[6], problem[9]
    idx = moba_gate(q, pool_keys(k, bs, cu, w), block_size=bs, top_k=top_k, tile=gate_tile(bs, q.shape[3]), cu_seqlens=cu)
    check_selection(idx, q, k, bs=bs, top_k=top_k, cu=cu, w=w, gap=GAP[dtype])


def test_gate_exact_on_ties():
    """All scores equal: the lower blocks win, as in the reference."""
    q = torch.ones(1, 1, 80, 16)
    k = torch.ones(1, 1, 80, 16)
    idx = moba_gate(q, pool_keys(k, 16), block_size=16, top_k=3, tile=gate_tile(16, q.shape[3]))
    assert torch.equal(idx, moba_block_selection(q, k, block_size=16, top_k=3))


class _Allocations(TorchDispatchMode):
    """The bytes of every distinct storage that torch ops return while active (allocations, and the
    interpreter's staging copies of kernel arguments)."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st_ = t.untyped_storage()
                self.storages[st_.data_ptr()] = max(self.storages.get(st_.data_ptr(), 0), st_.nbytes())
        return out


@pytest.mark.parametrize("varlen", [False, True])
def test_gate_never_materialises_scores(varlen):
    """No buffer the gate (with its pooling) allocates or launches on comes near one fp32 N x n_blocks
    score matrix (here 3x larger than q), and the kernel's only global store is the index tensor."""
    B, H, N, D, bs, top_k = 1, 2, 192, 16, 4, 3         # 48 blocks
    torch.manual_seed(0)
    q, k = torch.randn(B, H, N, D), torch.randn(B, 1, N, D)
    cu = torch.tensor([0, 80, 192], dtype=torch.int32) if varlen else None
    scores_bytes = B * H * N * -(-N // bs) * 4
    with _Allocations() as alloc, recording() as launches:
        idx = moba_gate(q, pool_keys(k, bs, cu), block_size=bs, top_k=top_k, tile=gate_tile(bs, q.shape[3]), cu_seqlens=cu)
    assert len(launches) == 1
    source = launches[0].kernel.source
    assert source.count("tl.store(") == 1 and "tl.store(idx_base" in source
    biggest = max(alloc.storages.values())              # q's staging copy for the interpreter
    assert biggest <= q.numel() * 4 < scores_bytes, (biggest, scores_bytes)
    check_selection(idx, q, k, bs=bs, top_k=top_k, cu=cu, w=None, gap=1e-4)


# ----------------------------------------------------------------------------------------------
# attention, given indices

@given(problems(), st.integers(0, 2**31 - 1))
@example((1, 2, 1, 1, 16, 16, 1, None, None, torch.float32), 0)                   # one query
@example((2, 4, 2, 77, 32, 16, 3, None, None, torch.float16), 1)
def test_attention_given_any_indices(problem, seed):
    """Random indices (future blocks, -1, duplicates, out of range, own block missing): the kernel
    attends to the union of the listed blocks, causally; rows with nothing get 0 and -inf."""
    q, k, v, _, cu = make(problem, seed)
    B, H, N, bs, top_k, dtype = problem[0], problem[1], problem[3], problem[5], problem[6], problem[9]
    g = torch.Generator().manual_seed(seed + 1)
    nb = -(-N // bs)
    idx = torch.randint(-1, nb + 2, (B, H, N, top_k), generator=g, dtype=torch.int32)
    out, lse = moba_attention_fwd(q, k, v, idx, block_size=bs, tile=attention_tile(bs, q.shape[3]), cu_seqlens=cu)   # densify: its own file
    r_out, r_lse = moba_attention_from_indices(q, k, v, idx, block_size=bs, cu_seqlens=cu)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), r_out.float(), **TOL[dtype])
    torch.testing.assert_close(lse, r_lse, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# the three stages chained

@given(problems(), st.integers(0, 2**31 - 1))
@example((1, 4, 2, 100, 32, 16, 3, [0, 33, 33, 100], 3, torch.float16), 4)        # varlen + kconv + GQA
@example((2, 2, 1, 50, 16, 32, 4, None, None, torch.float32), 5)                  # N < 2 blocks, batch 2
def test_forward_matches_reference(problem, seed):
    q, k, v, w, cu = make(problem, seed)
    bs, top_k, dtype = problem[5], problem[6], problem[9]
    out, lse, idx = moba_forward_kernels(q, k, v, block_size=bs, top_k=top_k, cu_seqlens=cu, kconv_weight=w)
    check_selection(idx, q, k, bs=bs, top_k=top_k, cu=cu, w=w, gap=GAP[dtype])
    r_out, r_lse = moba_attention_from_indices(q, k, v, idx, block_size=bs, cu_seqlens=cu)
    torch.testing.assert_close(out.float(), r_out.float(), **TOL[dtype])
    torch.testing.assert_close(lse, r_lse, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(lse).all()


def test_forward_empty_and_tiny():
    for N in (0, 1):
        q = torch.randn(1, 2, N, 16)
        out, lse, idx = moba_forward_kernels(q, q[:, :1], q[:, :1], block_size=16, top_k=2)
        assert out.shape == q.shape and lse.shape == (1, 2, N) and idx.shape == (1, 2, N, 2)
        if N:
            torch.testing.assert_close(out, q[:, :1].expand_as(q))
