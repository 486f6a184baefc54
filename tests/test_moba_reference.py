"""The MoBA eager reference (`moec.moba.reference`) against independent formulations: a per-query
loop written straight from the definition, dense causal SDPA when every block is selected, and
structural identities (GQA = repeated kv heads, packed sequences = separate calls)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from moec.moba.reference import (moba_attention_from_indices, moba_block_selection, moba_reference,
                                 pooled_keys)


def naive_moba(q, k, v, bs, top_k, cu=None, w=None):
    """One query at a time, loops everywhere: the definition in moec/moba/reference.py, spelled out."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    lse = torch.zeros(B, H, N, dtype=torch.float64)
    idx = torch.full((B, H, N, top_k), -1, dtype=torch.int32)
    segs = [(b, 0, N) for b in range(B)] if cu is None else [(0, a, e) for a, e in zip(cu[:-1], cu[1:])]
    for b, a, e in segs:
        L = e - a
        for hk in range(k.shape[1]):
            keys = k[b, hk, a:e].double()
            if w is not None:                        # causal depthwise conv, zero padded before the start
                kc = w.shape[2]
                conv = torch.zeros_like(keys)
                for t in range(L):
                    for s in range(kc):
                        src = t - (kc - 1) + s
                        if src >= 0:
                            conv[t] += w[hk, :, s].double() * keys[src]
                keys = conv
            nb = -(-L // bs)
            pooled = [keys[j * bs:min(L, (j + 1) * bs)].mean(0).to(k.dtype).double() for j in range(nb)]
            for h in range(hk * G, (hk + 1) * G):
                for t in range(L):
                    c = t // bs
                    qt = q[b, h, a + t].double()
                    scores = [float(qt @ pooled[j]) for j in range(c)]
                    past = sorted(range(c), key=lambda j: (-scores[j], j))[:top_k - 1]
                    chosen = sorted(past + [c])
                    idx[b, h, a + t, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                    pos = [s for j in chosen for s in range(j * bs, min(L, (j + 1) * bs)) if s <= t]
                    kk = k[b, hk, [a + s for s in pos]].double()
                    vv = v[b, hk, [a + s for s in pos]].double()
                    logits = kk @ qt / math.sqrt(D)
                    lse[b, h, a + t] = torch.logsumexp(logits, 0)
                    out[b, h, a + t] = torch.softmax(logits, 0) @ vv
    return out, lse, idx


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    H = hkv * draw(st.integers(1, 2))
    D = draw(st.sampled_from([4, 8]))
    bs = draw(st.sampled_from([3, 4, 8]))
    N = draw(st.integers(1, 30))
    top_k = draw(st.integers(1, 5))
    cu = None
    if B == 1 and draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, N), max_size=3)))
        cu = [0] + cuts + [N]
    kc = draw(st.sampled_from([None, 3, 5]))
    return B, H, hkv, N, D, bs, top_k, cu, kc


@given(problems(), st.integers(0, 2**31 - 1))
@example((1, 2, 1, 17, 4, 4, 2, [0, 5, 5, 17], 3), 0)
def test_reference_matches_naive_loops(problem, seed):
    B, H, hkv, N, D, bs, top_k, cu, kc = problem
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g, dtype=torch.float64) for h in (H, hkv, hkv))
    w = torch.randn(hkv, D, kc, generator=g, dtype=torch.float64) if kc else None
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    out, lse = moba_reference(q, k, v, block_size=bs, top_k=top_k, cu_seqlens=cu_t, kconv_weight=w)
    idx = moba_block_selection(q, k, block_size=bs, top_k=top_k, cu_seqlens=cu_t, kconv_weight=w)
    n_out, n_lse, n_idx = naive_moba(q, k, v, bs, top_k, cu, w)
    assert torch.equal(idx, n_idx)
    torch.testing.assert_close(out, n_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, n_lse, rtol=1e-10, atol=1e-10)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64 and idx.dtype == torch.int32


@pytest.mark.parametrize("N,bs,top_k", [(50, 16, 4), (50, 16, 9), (7, 16, 1), (64, 8, 8)])
def test_all_blocks_selected_is_dense_causal(N, bs, top_k):
    """top_k >= number of blocks: MoBA is causal attention (SDPA); GQA by repeated kv heads."""
    if -(-N // bs) > top_k:
        pytest.skip("not every block selected")
    torch.manual_seed(0)
    q = torch.randn(2, 4, N, 16)
    k, v = torch.randn(2, 2, N, 16), torch.randn(2, 2, N, 16)
    out, lse = moba_reference(q, k, v, block_size=bs, top_k=top_k)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kk, vv, is_causal=True), rtol=1e-5, atol=1e-5)
    s = (q @ kk.transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_top1_is_block_diagonal_causal():
    torch.manual_seed(1)
    N, bs = 40, 8
    q, k, v = torch.randn(1, 2, N, 8), torch.randn(1, 2, N, 8), torch.randn(1, 2, N, 8)
    out, _ = moba_reference(q, k, v, block_size=bs, top_k=1)
    t = torch.arange(N)
    mask = (t[:, None] // bs == t[None, :] // bs) & (t[None, :] <= t[:, None])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_varlen_equals_separate_sequences():
    torch.manual_seed(2)
    lens = [9, 0, 23, 16]
    cu = torch.tensor([0, 9, 9, 32, 48], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 48, 8), torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8)
    w = torch.randn(2, 8, 3)
    out, lse = moba_reference(q, k, v, block_size=4, top_k=3, cu_seqlens=cu, kconv_weight=w)
    a = 0
    for L in lens:
        o, l = moba_reference(q[:, :, a:a + L], k[:, :, a:a + L], v[:, :, a:a + L], block_size=4, top_k=3,
                              kconv_weight=w)
        torch.testing.assert_close(out[:, :, a:a + L], o)
        torch.testing.assert_close(lse[:, :, a:a + L], l)
        a += L


def test_selection_contract_and_ties():
    """Ascending, own block last, -1 padding; equal scores go to the lower block."""
    N, bs = 20, 4
    q = torch.ones(1, 1, N, 2)
    k = torch.ones(1, 1, N, 2)                 # every pooled key equal: all scores tie
    idx = moba_block_selection(q, k, block_size=bs, top_k=3)[0, 0]
    for t in range(N):
        c = t // bs
        expect = sorted(list(range(min(c, 2))) + [c]) + [-1] * (2 - min(c, 2))
        assert idx[t].tolist() == expect, (t, idx[t].tolist())
    # NaN ranks first, -inf still beats "nothing"
    q = torch.tensor([[1.0, 0.0]]).expand(12, 2).reshape(1, 1, 12, 2).clone()
    k = torch.zeros(1, 1, 12, 2)
    k[0, 0, 0:4, 0] = float("-inf")           # block 0 scores -inf
    k[0, 0, 4:8, 0] = float("nan")            # block 1 scores NaN
    idx = moba_block_selection(q, k, block_size=4, top_k=3)[0, 0]
    assert idx[11].tolist() == [0, 1, 2]
    idx = moba_block_selection(q, k, block_size=4, top_k=2)[0, 0]
    assert idx[11].tolist() == [1, 2] and idx[5].tolist() == [0, 1]


def test_pooled_keys_partial_block_and_rounding():
    k = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1)
    p = pooled_keys(k, 4)
    assert p.flatten().tolist() == [1.5, 5.5, 8.5]
    kh = (torch.randn(2, 10, 3) * 3).half()
    assert torch.equal(pooled_keys(kh, 4), pooled_keys(kh.float(), 4).half().float())


def test_attention_from_indices_contract_and_gradients():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    idx = torch.tensor([[0, 2, -1], [7, 2, 2]], dtype=torch.int32)[None, :, None, :].expand(1, 2, 12, 3).clone()
    idx[0, 0, 1] = torch.tensor([-1, 9, 1], dtype=torch.int32)          # row 1 of head 0: only future/garbage
    out, lse = moba_attention_from_indices(q, k, v, idx, block_size=4)
    assert torch.isinf(lse[0, 0, 1]) and torch.all(out[0, 0, 1] == 0)
    assert torch.isfinite(lse[0, 0, 0]) and torch.isinf(lse[0, 1, 0])   # head 1 row 0 listed block 2 only
    small = [t.detach()[:, :1, :6, :2].clone().requires_grad_() for t in (q, k, v)]
    fixed = torch.tensor([0, 2, -1], dtype=torch.int32).expand(1, 1, 6, 3)
    torch.autograd.gradcheck(lambda a, b, c: moba_attention_from_indices(a, b, c, fixed, block_size=2), small)


def test_rejects_bad_arguments():
    q, k = torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        moba_reference(q, k, k, block_size=4, top_k=2)
    q = torch.randn(2, 2, 8, 4)
    with pytest.raises(ValueError, match="B must be 1"):
        moba_reference(q, q, q, block_size=4, top_k=2, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(NotImplementedError):
        moba_reference(q, q, q, block_size=4, top_k=2, causal=False)
    with pytest.raises(ValueError, match="kconv_weight"):
        moba_reference(q, q, q, block_size=4, top_k=2, kconv_weight=torch.randn(2, 3, 3))
