"""The densify scheme of the MoBA attention forward (`moec.runtime.moba_window_kernel`: windows owning
their rows' softmax state, gathered rows per past block, then the own blocks) under the Triton
interpreter, against the eager reference: given the gate's indices and any hand-made indices, chained
with the gate (the full op), windows and chunks of every size; its memory formula. Also the backward's
key-block lists (`moec.runtime.moba_collect`): contents and no host synchronisation."""
from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import pytest

from moec.ops import moba_attention, moba_forward_kernels
from moec.moba.reference import moba_attention_from_indices, moba_block_selection, moba_reference
from moec.runtime.launch import recording
from moec.ir.tiles import MobaAttentionTile
from moec.ir.types import S, T, condition
from moec.passes.choose_moba_scheme import DENSIFY_BLOCKS_PER_K, densify_condition
from moec.passes.moba_tiles import densify_tile
from moec.runtime.moba_collect import collect_block_queries
from moec.runtime.moba_window_kernel import moba_window_fwd, plan_window, window_workspace_bytes
from test_moba_kernels import GAP, _Allocations, check_selection

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy: inf - inf

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}
LSE_TOL = dict(rtol=1e-4, atol=1e-4)
# half the profile's examples (6 under 'ci', 150 under 'large'): each runs several interpreted launches
FEW = settings(max_examples=max(6, settings.default.max_examples // 2))


# ----------------------------------------------------------------------------------------------
# problems: shapes, a tile pair small enough that lists span several chunks, and an index pattern

@st.composite
def problems(draw, max_n=96):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    hkv = draw(st.integers(1, 2))
    H = hkv * draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([16, 32, 24]))
    bs = draw(st.sampled_from([16, 32]))
    N = draw(st.integers(1, max_n))
    top_k = draw(st.integers(1, 8))
    B = draw(st.integers(1, 2))
    cu = None
    if B == 1 and draw(st.booleans()):
        cu = [0] + sorted(draw(st.lists(st.integers(0, N), max_size=3))) + [N]
    bm = draw(st.sampled_from([16, 32]))
    tile = MobaAttentionTile(bm, draw(st.sampled_from([16, 32])), 4, 1, bm * draw(st.sampled_from([1, 2, 4])))
    return dict(B=B, H=H, hkv=hkv, N=N, D=D, bs=bs, top_k=top_k, cu=cu, dtype=dtype, tile=tile)


def make(p, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(p["B"], h, p["N"], p["D"], generator=g).to(p["dtype"]) for h in (p["H"], p["hkv"], p["hkv"]))
    cu = torch.tensor(p["cu"], dtype=torch.int32) if p["cu"] else None
    return q, k, v, cu, g


def check(p, q, k, v, idx, cu):
    out, lse = moba_window_fwd(q, k, v, idx, block_size=p["bs"], cu_seqlens=cu, tile=p["tile"])
    r_out, r_lse = moba_attention_from_indices(q, k, v, idx, block_size=p["bs"], cu_seqlens=cu)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.float(), r_out.float(), **TOL[p["dtype"]])
    torch.testing.assert_close(lse, r_lse, **LSE_TOL)
    return out, lse


def P(B=1, H=2, hkv=1, N=80, D=16, bs=16, top_k=3, cu=None, dtype=torch.float32, bm=16, bn=16, window=32):
    return dict(B=B, H=H, hkv=hkv, N=N, D=D, bs=bs, top_k=top_k, cu=cu, dtype=dtype,
                tile=MobaAttentionTile(bm, bn, 4, 1, window))


# ----------------------------------------------------------------------------------------------
# attention given indices

@FEW
@given(problems(), st.integers(0, 2**31 - 1))
@example(P(N=90, top_k=1), 1)                                              # top_k = 1: own block only
@example(P(B=2, H=4, hkv=2, N=77, D=32, top_k=8, dtype=torch.float16, bm=32), 2)   # top_k > blocks, GQA
@example(P(N=95, bs=32, top_k=3, cu=[0, 5, 5, 70, 95], bm=32, window=64), 3)  # varlen, empty sequence
def test_densify_matches_reference_on_gate_indices(p, seed):
    q, k, v, cu, _ = make(p, seed)
    idx = moba_block_selection(q, k, block_size=p["bs"], top_k=p["top_k"], cu_seqlens=cu)
    _, lse = check(p, q, k, v, idx, cu)
    assert torch.isfinite(lse).all()


@FEW
@given(problems(), st.integers(0, 2**31 - 1), st.sampled_from(["random", "same", "shuffled"]))
@example(P(N=1, top_k=2), 0, "random")                                     # one query
@example(P(B=2, H=3, hkv=1, N=96, top_k=4, dtype=torch.float16, window=64), 1, "same")
@example(P(N=96, D=24, top_k=6, cu=[0, 17, 96], bm=32, bn=32), 2, "shuffled")
def test_densify_matches_reference_on_any_indices(p, seed, pattern):
    """random: -1, future and out-of-range blocks, duplicates, own block missing (rows with nothing:
    0 and -inf). same: every slot of every query picks block 0 or its own (every row of a window
    gathered for block 0: several chunks). shuffled: the gate's selection, slots permuted per row
    (duplicate-free, unsorted)."""
    q, k, v, cu, g = make(p, seed)
    B, H, N, bs, K = p["B"], p["H"], p["N"], p["bs"], p["top_k"]
    if pattern == "random":
        idx = torch.randint(-1, -(-N // bs) + 2, (B, H, N, K), generator=g, dtype=torch.int32)
    elif pattern == "same":
        idx = torch.full((B, H, N, K), -1, dtype=torch.int32)
        idx[..., 0] = 0
        if K > 1:
            starts = torch.zeros(N, dtype=torch.int64) if cu is None else \
                torch.tensor(p["cu"][:-1])[torch.searchsorted(torch.tensor(p["cu"][1:]), torch.arange(N), right=True)]
            idx[..., 1] = ((torch.arange(N) - starts) // bs).to(torch.int32)
    else:
        idx = moba_block_selection(q, k, block_size=bs, top_k=K, cu_seqlens=cu)
        perm = torch.rand(B, H, N, K, generator=g).argsort(-1)
        idx = idx.gather(-1, perm)
    check(p, q, k, v, idx, cu)


# ----------------------------------------------------------------------------------------------
# the full op (gate + densify) and the scheme switch

@FEW
@given(problems(), st.integers(0, 2**31 - 1), st.sampled_from([None, 3]))
@example(P(H=4, hkv=2, N=96, D=32, top_k=3, cu=[0, 33, 33, 96], dtype=torch.float16), 4, 3)
@example(P(B=2, N=50, bs=32, top_k=4), 5, None)
def test_full_op_with_densify_matches_reference(p, seed, kc):
    q, k, v, cu, g = make(p, seed)
    w = torch.randn(p["hkv"], p["D"], kc, generator=g) * 0.5 if kc else None
    bs, K = p["bs"], p["top_k"]
    with recording() as launches:
        out, lse, idx = moba_forward_kernels(q, k, v, block_size=bs, top_k=K, cu_seqlens=cu, kconv_weight=w,
                                             scheme="densify")
    assert any("moba_window" in r.kernel.fn_name for r in launches)
    check_selection(idx, q, k, bs=bs, top_k=K, cu=cu, w=w, gap=GAP[p["dtype"]])     # the reference's, up to ties
    r_out, r_lse = moba_attention_from_indices(q, k, v, idx, block_size=bs, cu_seqlens=cu)
    torch.testing.assert_close(out.float(), r_out.float(), **TOL[p["dtype"]])
    torch.testing.assert_close(lse, r_lse, **LSE_TOL)
    assert torch.isfinite(lse).all()


def test_op_scheme_argument():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, 70, 16, generator=g) for h in (2, 1, 1))
    r_out, r_lse = moba_reference(q, k, v, block_size=8, top_k=2)
    for scheme, kernel in (("densify", "moec_moba_window"), ("rows", "moec_moba_attention"),
                           ("auto", "moec_moba_attention")):      # 9 blocks <= 4 * top_k: rows
        with recording() as launches:
            out, lse = moba_attention(q, k, v, block_size=8, top_k=3 if scheme == "auto" else 2,
                                      return_lse=True, scheme=scheme)
        assert kernel in {r.kernel.fn_name.split("_bs")[0] for r in launches}, scheme
        if scheme != "auto":
            torch.testing.assert_close(out, r_out, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lse, r_lse, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="scheme"):
        moba_attention(q, k, v, block_size=8, top_k=2, scheme="columns")


def densify(block_size, top_k, n_rows, n_seqs=None):
    """Whether choose-moba-scheme's condition takes densify for these sizes."""
    cond = condition(densify_condition(block_size, top_k, n_seqs is not None))
    return bool(cond.subs({T: n_rows, S: n_seqs or 1}))


def test_auto_rule():
    """Densify once the average sequence has more than DENSIFY_BLOCKS_PER_K * top_k blocks; the
    compiled program takes the branch the condition picks, and runs only its kernels."""
    f = DENSIFY_BLOCKS_PER_K
    assert not densify(128, 8, 128 * 8 * f)
    assert densify(128, 8, 128 * 8 * f + 1)
    assert densify(128, 8, 524288)
    assert not densify(128, 8, 524288, n_seqs=512)          # 1K each
    assert densify(128, 8, 524288, n_seqs=1) and not densify(128, 8, 1024, n_seqs=0)
    q = torch.randn(1, 1, 16 * 2 * f + 1, 16)
    for N, kernels in ((16 * 2 * f, ["moec_moba_gate", "moec_moba_attention"]),
                       (16 * 2 * f + 1, ["moec_moba_gate", "moec_moba_window"])):
        with recording() as launches:
            out, _, idx = moba_forward_kernels(q[:, :, :N], q[:, :, :N], q[:, :, :N], block_size=16, top_k=2)
        assert [r.kernel.fn_name.split("_bs")[0] for r in launches] == kernels
        torch.testing.assert_close(out, moba_attention_from_indices(q[:, :, :N], q[:, :, :N], q[:, :, :N], idx,
                                                                    block_size=16)[0], rtol=1e-4, atol=1e-5)
    with recording() as launches:                           # top_k = 1: the own block alone, always rows
        moba_forward_kernels(q, q, q, block_size=16, top_k=1)
    assert "moec_moba_attention" in launches[-1].kernel.fn_name


def test_window_state_carries_across_many_blocks():
    """One window, every row selecting many past blocks in different orders (the state is read back and
    continued block after block; rows start afresh at their first past block, whichever it is), fp16
    rounding no worse than one softmax's."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, h, 128, 32, generator=g).half() for h in (2, 1, 1))
    idx = moba_block_selection(q, k, block_size=8, top_k=12)
    idx = idx.gather(-1, torch.rand(idx.shape, generator=g).argsort(-1))
    r_out, r_lse = moba_attention_from_indices(q.float(), k.float(), v.float(), idx, block_size=8)
    out, lse = moba_window_fwd(q, k, v, idx, block_size=8, tile=MobaAttentionTile(16, 16, 4, 1, 128))
    torch.testing.assert_close(lse, r_lse, **LSE_TOL)
    assert (out.float() - r_out).abs().max().item() < 2e-3


def test_strided_inputs_and_empty():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 40, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    idx = moba_block_selection(q, k, block_size=8, top_k=3).transpose(2, 3).contiguous().transpose(2, 3)
    tiles = dict(tile=densify_tile(8, 16))
    out, lse = moba_window_fwd(q, k, v, idx, block_size=8, **tiles)
    r_out, r_lse = moba_attention_from_indices(q, k, v, idx, block_size=8)
    torch.testing.assert_close(out, r_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, **LSE_TOL)
    q0 = torch.randn(1, 2, 0, 16)
    out, lse = moba_window_fwd(q0, q0[:, :1], q0[:, :1], torch.zeros(1, 2, 0, 3, dtype=torch.int32), block_size=8,
                               **tiles)
    assert out.shape == q0.shape and lse.shape == (1, 2, 0)


# ----------------------------------------------------------------------------------------------
# collect (the backward's key-block lists): contents, no host synchronisation

def expected_lists(idx, bs, hkv, cu):
    """{(b, hk, packed block): sorted [(h, row)]} by brute force."""
    B, H, N, K = idx.shape
    G = H // hkv
    bounds = [(0, N)] if cu is None else list(zip(cu[:-1], cu[1:]))
    boff, want = [], {}
    for a, e in bounds:
        boff.append(sum(-(-(y - x) // bs) for x, y in bounds[:len(boff)]))
    for b in range(B):
        for h in range(H):
            for s_i, (a, e) in enumerate(bounds):
                for t in range(a, e):
                    for j in set(int(x) for x in idx[b, h, t]):
                        if 0 <= j < (t - a) // bs:
                            want.setdefault((b, h // G, boff[s_i] + j), []).append((h, t))
    return {key: sorted(v) for key, v in want.items()}


@pytest.mark.parametrize("cu", [None, [0, 30, 30, 61, 100]])
def test_collect_lists(cu):
    g = torch.Generator().manual_seed(1)
    B, H, hkv, N, K, bs = (1, 4, 2, 100, 5, 8) if cu else (2, 4, 2, 100, 5, 8)
    idx = torch.randint(-1, 14, (B, H, N, K), generator=g, dtype=torch.int32)
    lists = collect_block_queries(idx, block_size=bs, kv_heads=hkv,
                                  cu_seqlens=torch.tensor(cu, dtype=torch.int32) if cu else None)
    want = expected_lists(idx, bs, hkv, cu)
    got, NB = {}, lists.n_blocks
    off = lists.offsets.tolist()
    for s in range(lists.n_seg):
        if off[s + 1] > off[s]:
            ent = lists.entries[off[s]:off[s + 1]]
            rows = ent // K
            got[(s // NB // hkv, s // NB % hkv, s % NB)] = list(zip(((rows // N) % H).tolist(), (rows % N).tolist()))
    assert got == want                              # grouped, ascending (head, row), own block and repeats left out
    slots = lists.entries[:off[-1]] % K             # one entry per (query, slot): no partial written twice
    assert lists.entries[:off[-1]].unique().numel() == off[-1] and bool((slots < K).all())
    if cu:
        starts = lists.blocks[0].tolist()
        for s_i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
            b0 = sum(-(-(y - x) // bs) for x, y in zip(cu[:s_i], cu[1:s_i + 1]))
            assert starts[b0:b0 + -(-(e - a) // bs)] == list(range(a, e, bs))


class _Watch(TorchDispatchMode):
    """Every aten op and the shape of every tensor it returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("varlen", [False, True])
def test_collect_never_synchronises(varlen):
    """No .item()/nonzero and the same allocations whatever the routing: sizes come from shapes only."""
    cu = torch.tensor([0, 40, 64], dtype=torch.int32) if varlen else None
    seen = []
    for fill in ("random", "none", "all_block0"):
        if fill == "random":
            idx = torch.randint(-1, 8, (1, 4, 64, 3), dtype=torch.int32)
        elif fill == "none":
            idx = torch.full((1, 4, 64, 3), -1, dtype=torch.int32)
        else:
            idx = torch.zeros((1, 4, 64, 3), dtype=torch.int32)
        with _Watch() as w:
            collect_block_queries(idx, block_size=8, kv_heads=2, cu_seqlens=cu)
        assert not [op for op in w.ops if "_local_scalar_dense" in op or "nonzero" in op or "item" in op]
        seen.append(w.shapes)
    assert seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize("cu", [None, [0, 40, 40, 96]])
def test_workspace_formula_bounds_allocations_and_fits_512k(cu):
    B, H, hkv, N, D, bs, K = 1, 4, 2, 96, 16, 8, 4
    q, k = torch.randn(B, H, N, D).half(), torch.randn(B, hkv, N, D).half()
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    idx = moba_block_selection(q, k, block_size=bs, top_k=K, cu_seqlens=cu_t)
    with _Allocations() as alloc:
        plan_window(q, k, k, idx, block_size=bs, tile=MobaAttentionTile(16, 16, 4, 1, 32), cu_seqlens=cu_t)
    planned = sum(alloc.storages.values()) - B * H * N * D * 2 - B * H * N * 4   # less out and lse
    assert planned <= window_workspace_bytes(B, H, N, D, 32, len(cu) - 1 if cu else 0)
    big = window_workspace_bytes(1, 16, 524288, 128, 256)
    assert big < 4.5e9, big                       # the running state: a quarter of bf16 per-slot partials at K = 8
