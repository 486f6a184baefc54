"""MoBA over packed sequences written as a Python loop over ``cu_seqlens`` (MoBA's own reference style:
``.item()`` bounds, per-chunk slice means, in-place gate masks, a threshold at the k-th gate value, fp32
attention accumulated into a view of the output), compiled by `moec.compile`: each sequence's core runs
the generated kernels, the loop and the rest stay PyTorch. Every compiled output is compared with an
eager copy made before compiling."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import moec
from moec.runtime.launch import recording

from moba_zoo import PackedMobaAttention, VarlenLoopMoba, VarlenNaiveMoba, moba_dense_mask, moba_varlen_loop

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def region_of(m):
    return m.__dict__["_moec_region"]


def packed(lengths, H=2, D=16, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    S = sum(lengths)
    q, k, v = (torch.randn(S, H, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def compiled_pair(module):
    ref = copy.deepcopy(module)
    return moec.compile(module), ref


def test_moba_reference_style_loop_is_lifted():
    """The first call is the example: lifted with the block size and top_k of the code, one core per
    sequence running the kernels; equal to eager and to moec's own varlen op on the same packing."""
    m, ref = compiled_pair(VarlenNaiveMoba(chunk_size=8, topk=3))
    q, k, v, cu = packed([29, 1, 40])
    with recording() as launches:
        out = m(q, k, v, cu, 40)
    torch.testing.assert_close(out, ref(q, k, v, cu, 40), rtol=1e-4, atol=1e-5)
    text = m.explain()
    assert "LIFTED" in text and "block_size=8, top_k=3" in text and "packed sequences" in text, text
    assert region_of(m).calls["kernels"] == 3
    assert sum(r.kernel.fn_name.startswith("moec_moba_attention") for r in launches) == 3
    bhnd = tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    op = moec.ops.moba_attention(*bhnd, block_size=8, top_k=3, cu_seqlens=cu)[0].squeeze(0).transpose(0, 1)
    torch.testing.assert_close(op, out, rtol=1e-4, atol=1e-5)


def test_a_new_packing_is_traced_and_a_repeated_one_reuses_its_graph():
    m, ref = compiled_pair(VarlenLoopMoba(block_size=8, top_k=3))
    for lengths in ([13, 0, 32], [50], [13, 0, 32], [7, 7, 7, 30]):          # empty sequences too
        q, k, v, cu = packed(lengths, seed=len(lengths))
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v, cu), ref(q, k, v, cu), rtol=1e-4, atol=1e-5)
    region = region_of(m)
    assert region.state == "lifted" and len(region.graphs) == 3, m.explain()
    assert region.calls["kernels"] == 2 + 1 + 2 + 4


@given(lengths=st.lists(st.integers(1, 45), min_size=1, max_size=4), block=st.sampled_from([4, 8, 16]),
       topk=st.integers(1, 4), heads=st.sampled_from([1, 3]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 99))
def test_packed_loop_matches_eager(lengths, block, topk, heads, dtype, seed):
    """Random packings, block sizes, top-k, heads and dtypes: the compiled loop is eager's answer (rows
    whose gate is a near tie may pick another block in fp16: compared in fp32 here)."""
    m, ref = compiled_pair(VarlenNaiveMoba(chunk_size=block, topk=topk))
    q, k, v, cu = packed(lengths, H=heads, dtype=dtype, seed=seed)
    with torch.no_grad():
        out, want = m(q, k, v, cu, max(lengths)), ref(q, k, v, cu, max(lengths))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=tol, atol=1e-5)
    else:
        assert (out.float() - want.float()).abs().max() <= tol * max(1.0, want.abs().max().item())


def test_gradients_through_the_packed_cores_match_eager():
    m, ref = compiled_pair(VarlenNaiveMoba(chunk_size=8, topk=2))
    ins = packed([20, 33], grad=True)
    ins_ref = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in ins)
    out, want = m(*ins, 33), ref(*ins_ref, 33)
    w = torch.randn_like(want)
    (out * w).sum().backward()
    (want * w).sum().backward()
    for a, b in zip(ins[:3], ins_ref[:3]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert region_of(m).calls["kernels forward and backward"] == 2


def test_offsets_made_from_shapes_inside_an_attention_module():
    """A module that packs its batch itself (``cu_seqlens = arange(0, (B + 1) N, N)``) traces without reading
    any argument's values: one core per batch row, analysed at compile time; projections train as eager."""
    torch.manual_seed(0)
    m, ref = compiled_pair(PackedMobaAttention(d=32, heads=4, chunk_size=8, topk=3))
    assert region_of(m).state == "lifted", m.explain()
    x = torch.randn(3, 45, 32)
    out, want = m(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert not region_of(m).lifted.host


class ThresholdLoop(torch.nn.Module):
    """Reads a float tensor's value with .item(): a loop over computed data, not over sequence offsets."""

    def forward(self, q, k, v, cutoff):
        n = int(cutoff.item() * q.shape[0])
        return moba_varlen_loop(q, k, v, torch.tensor([0, n, q.shape[0]], dtype=torch.int32), 8, 3)


class Offsets(torch.nn.Module):
    """Reads an integer argument that is no sequence offsets (a block count per call)."""

    def forward(self, q, k, v, blocks):
        bs = q.shape[0] // int(blocks.item())
        return moba_varlen_loop(q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), bs, 2)


def test_value_loops_moec_does_not_follow_stay_eager_with_the_reason():
    q, k, v, _ = packed([40])
    m, ref = compiled_pair(ThresholdLoop())
    torch.testing.assert_close(m(q, k, v, torch.tensor(0.5)), ref(q, k, v, torch.tensor(0.5)))
    assert "not over computed data" in m.explain(), m.explain()
    m, ref = compiled_pair(Offsets())
    torch.testing.assert_close(m(q, k, v, torch.tensor(4)), ref(q, k, v, torch.tensor(4)))
    assert "not sequence offsets" in m.explain(), m.explain()


def test_one_sequence_shorter_than_a_block_waits_for_a_telling_call():
    """A first call whose sequences all fit in one block cannot show the block size: analysed again later."""
    m, ref = compiled_pair(VarlenNaiveMoba(chunk_size=16, topk=2))
    for lengths in ([5, 9], [40, 3]):
        q, k, v, cu = packed(lengths)
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v, cu, max(lengths)), ref(q, k, v, cu, max(lengths)),
                                       rtol=1e-4, atol=1e-5)
    assert region_of(m).state == "lifted", m.explain()
    assert region_of(m).calls["kernels"] == 2


def test_a_packing_eager_code_fails_on_raises_as_eager_and_a_later_call_lifts():
    """MoBA's reference style cannot take an empty sequence (``torch.cat`` of no chunk means): the compiled
    module raises eager's error for it, and the next call is analysed and lifted."""
    m, ref = compiled_pair(VarlenNaiveMoba(chunk_size=8, topk=3))
    q, k, v, cu = packed([0, 20])
    with pytest.raises(ValueError, match="non-empty list"):
        ref(q, k, v, cu, 20)
    with pytest.raises(ValueError, match="non-empty list"):
        m(q, k, v, cu, 20)
    q, k, v, cu = packed([20, 30])
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v, cu, 30), ref(q, k, v, cu, 30), rtol=1e-4, atol=1e-5)
    assert region_of(m).state == "lifted", m.explain()


class WithPositions(torch.nn.Module):
    """Packed sequences with position ids used as data (a rotary-like phase): the offsets' values are read,
    the positions' are not."""

    def forward(self, q, k, v, cu_seqlens, position_ids):
        phase = torch.cos(position_ids.float()[:, None, None] * 0.01)
        return moba_varlen_loop(q * phase, k * phase, v, cu_seqlens, 8, 3)


def test_integer_positions_beside_the_offsets_are_inputs_not_values():
    m, ref = compiled_pair(WithPositions())
    for lengths in ([30, 20], [41, 9, 17]):
        q, k, v, cu = packed(lengths)
        pos = torch.cat([torch.arange(n) for n in lengths])
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v, cu, pos), ref(q, k, v, cu, pos), rtol=1e-4, atol=1e-5)
    assert region_of(m).state == "lifted" and region_of(m).lifted.host == ("cu_seqlens",), m.explain()


class LongSequencesShift(torch.nn.Module):
    """Dense-mask MoBA per packed sequence whose causal diagonal moves for sequences past 100 tokens: the same
    op sequence with another integer, which the probe never saw."""

    def forward(self, q, k, v, cu_seqlens):
        out = torch.zeros_like(q)
        for i in range(cu_seqlens.numel() - 1):
            a, b = cu_seqlens[i].item(), cu_seqlens[i + 1].item()
            shift = 1 if b - a > 100 else 0
            t = tuple(x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out[a:b] = dense_with_diagonal(*t, 8, 3, shift).squeeze(0).transpose(0, 1)
        return out


def dense_with_diagonal(q, k, v, block_size, top_k, diagonal):
    B, H, N, D = q.shape
    nb = -(-N // block_size)
    pooled = F.pad(k, (0, 0, 0, nb * block_size - N)).reshape(B, H, nb, block_size, D).mean(dim=3)
    q_blk, blk = torch.arange(N)[:, None] // block_size, torch.arange(nb)[None, :]
    gate = (q @ pooled.transpose(-1, -2)).masked_fill(blk > q_blk, float("-inf")).masked_fill(blk == q_blk, float("inf"))
    chosen = torch.zeros(B, H, N, nb, dtype=torch.bool).scatter_(-1, gate.topk(min(top_k, nb), dim=-1).indices, True)
    mask = chosen.repeat_interleave(block_size, dim=-1)[..., :N] & torch.ones(N, N, dtype=torch.bool).tril(diagonal)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def test_an_integer_that_changes_with_the_length_is_probed_before_it_runs():
    m, ref = compiled_pair(LongSequencesShift())
    with torch.no_grad():
        for lengths in ([20, 30], [20, 150]):
            q, k, v, cu = packed(lengths)
            torch.testing.assert_close(m(q, k, v, cu), ref(q, k, v, cu), rtol=1e-4, atol=1e-5)
    assert region_of(m).state == "lifted", m.explain()


class AppendsToCache(torch.nn.Module):
    def forward(self, q, k, v, cache):
        cache.append(k)
        return moba_dense_mask(q, k, v, 8, 3)


def test_a_forward_that_changes_a_container_argument_stays_eager():
    """A graph cannot replay ``cache.append(k)``: the module runs eagerly (the list gets its tensor, no proxy)."""
    m, ref = compiled_pair(AppendsToCache())
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    got, want = [], []
    torch.testing.assert_close(m(q, k, v, got), ref(q, k, v, want))
    assert len(got) == 1 and type(got[0]) is torch.Tensor and torch.equal(got[0], want[0])
    assert "cannot key" in m.explain(), m.explain()
