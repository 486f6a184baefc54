"""MoBA written in eager PyTorch, compiled by `moec.compile`: the core is lifted into moec's IR ops and
runs the generated kernels, the rest of the module stays PyTorch, and `explain()` says which cores
were lifted (block size, top_k, GQA group, kernels and tiles) or why not. Compiled outputs are
compared with the module's own eager forward."""
from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moec
from moec.frontend.moba_probe import near_ties
from moec.runtime.launch import recording

from moba_zoo import FORMULATIONS, Block, MobaAttention, MobaCore, _gate

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
LIFTABLE = ("dense", "sdpa", "gather", "loop", "bnhd", "sum_count")


def region_of(m):
    return m.__dict__["_moec_region"]


def qkv(B=2, H=4, Hkv=2, N=45, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))


def layout(formulation, *ts):
    """Core inputs in the formulation's layout (``bnhd``: [B, N, heads, D] views)."""
    return tuple(t.transpose(1, 2) for t in ts) if formulation == "bnhd" else ts


def twins(cls, *args, **kwargs):
    """A module and an identical, uncompiled copy."""
    torch.manual_seed(0)
    a = cls(*args, **kwargs)
    b = cls(*args, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def assert_close_rows(out, ref, keep=None, dtype=torch.float32):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if keep is not None:
        out, ref = out[keep], ref[keep]
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    assert err <= tol * max(ref.float().abs().max().item(), 1.0), err


@pytest.mark.parametrize("formulation", LIFTABLE)
def test_attention_module_lifts_and_matches_eager(formulation):
    """q/k/v/o projections and the reshape to heads stay eager; the core runs moec's two kernels."""
    m, ref = twins(MobaAttention, formulation=formulation)
    moec.compile(m)
    x = torch.randn(2, 45, 64)
    with torch.no_grad(), recording() as launches:
        y = m(x)
    assert {r.kernel.fn_name.split("_bs")[0] for r in launches} == {"moec_moba_gate", "moec_moba_attention"}
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    text = m.explain()
    assert "LIFTED  <root> (MobaAttention)" in text
    assert "block_size=16, top_k=3" in text and "GQA group 2" in text
    assert "fused_block_gate: moec_moba_gate_bs16_k3, tile 64x32, 4 warps, 1 stage" in text
    assert "block_sparse_attention: moec_moba_attention_bs16_k3" in text
    assert "eager submodules: q_proj, k_proj, v_proj, o_proj" in text
    assert region_of(m).calls["kernels"] == 1


@pytest.mark.parametrize("formulation", LIFTABLE)
def test_core_module_lifts_at_first_call(formulation):
    """forward(q, k, v) has no input width to make up: the first call is the example."""
    m, ref = twins(MobaCore, block_size=16, top_k=3, formulation=formulation)
    moec.compile(m)
    assert "PENDING <root> (MobaCore)" in m.explain()
    q, k, v = layout(formulation, *qkv(N=40))
    out = m(q, k, v)
    torch.testing.assert_close(out, ref(q, k, v), rtol=1e-4, atol=1e-5)
    assert region_of(m).state == "lifted", m.explain()
    out2 = m(q=q, k=k, v=v)                                      # keywords bind to the same signature
    torch.testing.assert_close(out2, out)
    assert len(region_of(m).graphs) == 1 and region_of(m).calls["kernels"] == 2


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(formulation=st.sampled_from(LIFTABLE), N=st.integers(1, 80), B=st.integers(1, 2),
       heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1)]), top_k=st.integers(1, 4),
       block_size=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
def test_compiled_core_matches_eager(formulation, N, B, heads, top_k, block_size, dtype, seed):
    H, Hkv = heads
    m, ref = twins(MobaCore, block_size=block_size, top_k=top_k, formulation=formulation)
    moec.compile(m)
    q, k, v = qkv(B, H, Hkv, N, 16, dtype, seed)
    with torch.no_grad():
        m(*layout(formulation, *qkv(B, H, Hkv, 37, 16, dtype)))        # the first call is the example
        out, want = m(*layout(formulation, q, k, v)), ref(*layout(formulation, q, k, v))
    out, want = layout(formulation, out, want)
    assert region_of(m).state == "lifted", m.explain()
    assert region_of(m).calls["kernels"] == 2, region_of(m).calls
    assert out.dtype == want.dtype == dtype
    keep = ~near_ties(q, k, block_size, top_k, dtype)          # fp16: a rounded gate may flip near ties
    assert_close_rows(out, want, keep, dtype)


def test_projections_backward_matches_eager():
    """Training: generated kernels forward and backward over the same blocks; the projections get gradients."""
    m, ref = twins(MobaAttention, formulation="gather")
    moec.compile(m)
    x = torch.randn(2, 40, 64)
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert region_of(m).calls["kernels forward and backward"] == 1
    assert region_of(m).calls["backward: kernels"] == 1
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_first_call_with_one_token_waits_for_a_telling_call():
    m, ref = twins(MobaCore, block_size=16, top_k=3)
    moec.compile(m)
    one = qkv(N=1)
    torch.testing.assert_close(m(*one), ref(*one))
    assert region_of(m).state == "pending" and any("N=1" in c for c in region_of(m).calls)
    torch.testing.assert_close(m(*qkv(N=40)), ref(*qkv(N=40)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(*one), ref(*one), rtol=1e-4, atol=1e-5)
    assert region_of(m).state == "lifted" and region_of(m).calls["kernels"] == 2


def test_sequence_length_one_and_new_shapes():
    m, ref = twins(MobaAttention, formulation="dense")
    moec.compile(m)
    with torch.no_grad():
        for B, N in ((1, 1), (3, 1), (2, 17), (1, 64)):
            x = torch.randn(B, N, 64)
            torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    r = region_of(m)
    assert r.calls["kernels"] == 4 and len(r.graphs) == 4           # one specialised graph per signature


def test_nested_block_and_class_decorator(tmp_path):
    """A transformer block: only the attention's core is lifted; the norms and the MLP stay eager."""
    Compiled = moec.compile(Block, dump_dir=tmp_path)
    torch.manual_seed(0)
    m = Compiled(formulation="sdpa")
    ref = Block(formulation="sdpa")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 33, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    text = m.explain()
    assert "LIFTED  attn (MobaAttention)" in text and "token mask + scaled_dot_product_attention" in text
    d = tmp_path / "attn_moba.float32.cpu"
    assert sorted(p.name for p in d.glob("ir.*")) == ["ir.00.captured.txt", "ir.01.verify.txt",
                                                       "ir.02.infer-shapes.txt", "ir.03.fuse-block-gate.txt",
                                                       "ir.04.choose-moba-scheme.txt", "ir.05.choose-tiles.txt"]
    assert len(list((d / "kernels").glob("*.py"))) == 3          # gate; rows, or densify
    assert (d / "launches.json").exists() and "fused_block_gate" in (d / "tiles.json").read_text()
    assert "LIFTED  attn (MobaAttention)" in (tmp_path / "explain.txt").read_text()


NOT_LIFTED = {
    "maxpool": "amax-pooled keys",
    "no_own_block": "own block is not forced into the selection",
    "non_causal": "attention is not causal",
}


@pytest.mark.parametrize("formulation", NOT_LIFTED)
def test_variants_stay_eager_with_the_reason(formulation):
    m, ref = twins(MobaAttention, formulation=formulation)
    moec.compile(m)
    x = torch.randn(2, 40, 64)
    with recording() as launches:
        torch.testing.assert_close(m(x), ref(x))
    assert not launches
    text = m.explain()
    assert "EAGER   <root> (MobaAttention): MoBA core not lifted" in text and NOT_LIFTED[formulation] in text


def test_block_size_not_constant():
    m, ref = twins(MobaAttention, block_size=None)            # block size N // 4
    moec.compile(m)
    x = torch.randn(2, 40, 64)
    torch.testing.assert_close(m(x), ref(x))
    assert "the block size is not a constant" in m.explain()


class ReturnsSelection(MobaCore):
    """A dense-mask core that also returns the selected blocks: an intermediate escapes the core."""

    def forward(self, q, k, v):
        B, H, N, D = q.shape
        G = H // k.shape[1]
        idx, nb = _gate(q, k, self.block_size, self.top_k)
        chosen = torch.zeros(B, H, N, nb, dtype=torch.bool).scatter_(-1, idx, True)
        mask = chosen.repeat_interleave(self.block_size, -1)[..., :N] & torch.ones(N, N, dtype=torch.bool).tril()
        s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) / D ** 0.5
        return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(G, 1), idx


class DenseWhenShort(MobaCore):
    """Plain causal attention when the sequence fits in top_k blocks (where MoBA equals it), MoBA after."""

    def forward(self, q, k, v):
        if q.shape[2] <= self.block_size * self.top_k:
            G = q.shape[1] // k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
        return FORMULATIONS["gather"](q, k, v, self.block_size, self.top_k)


def test_code_path_without_a_core_runs_eagerly_for_that_shape():
    m, ref = twins(DenseWhenShort, block_size=16, top_k=2)
    moec.compile(m)
    long, short = qkv(N=70), qkv(N=20)
    with torch.no_grad():
        torch.testing.assert_close(m(*long), ref(*long), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m(*short), ref(*short))
    r = region_of(m)
    assert r.state == "lifted" and r.calls["kernels"] == 1
    assert any(k.startswith("eager: no liftable MoBA core in this call") for k in r.calls), r.calls


def test_unsupported_calls_fall_back_with_reasons():
    m, ref = twins(MobaCore, block_size=16, top_k=3)
    moec.compile(m)
    q, k, v = qkv(N=40)
    m(q, k, v)
    for dtype in (torch.bfloat16, torch.float64):
        a = tuple(t.to(dtype) for t in (q, k, v))
        torch.testing.assert_close(m(*a), ref(*a))
    with moec.disabled():
        m(q, k, v)
    calls = region_of(m).calls
    assert calls["kernels"] == 1 and calls["eager: moec.disabled() is active"] == 1
    assert any("bfloat16 on CPU" in c for c in calls) and any("float64" in c for c in calls)
    assert "calls: 1 x kernels" in m.explain()


def test_modules_without_a_core():
    """A top-k that is not a MoBA gate is not reported; MoBA whose scores escape the core stays eager."""
    class Sampler(torch.nn.Module):
        def forward(self, logits):
            return torch.topk(logits, 2).indices

    s = moec.compile(Sampler())
    logits = torch.randn(3, 10)
    torch.testing.assert_close(s(logits), torch.topk(logits, 2).indices)
    assert "_moec_region" not in s.__dict__ and "no MoE layer found" in s.explain()
    m, ref = twins(ReturnsSelection)
    moec.compile(m)
    out, want = m(*qkv(N=40)), ref(*qkv(N=40))
    torch.testing.assert_close(out[0], want[0])
    torch.testing.assert_close(out[1], want[1])
    assert "is also used outside it" in m.explain(), m.explain()


class CountsCalls(MobaCore):
    """Python-side state (a call counter): a traced graph could not replay it."""

    def forward(self, q, k, v):
        self.seen = getattr(self, "seen", 0) + 1
        return super().forward(q, k, v)


def test_state_changes_and_attribute_edits_are_safe():
    m, ref = twins(CountsCalls)
    moec.compile(m)
    m(*qkv(N=40))
    assert m.seen == 1 and "module state changes cannot be replayed" in m.explain()
    m, ref = twins(MobaCore, block_size=16, top_k=3)
    moec.compile(m)
    q, k, v = qkv(N=70)
    m(q, k, v)
    m.top_k = ref.top_k = 2                       # read as a constant by the trace: a new signature
    torch.testing.assert_close(m(q, k, v), ref(q, k, v))
    assert any("selects top-2 of 5 blocks" in c for c in region_of(m).calls), region_of(m).calls


def test_new_op_sequence_is_probed_before_it_runs():
    """MoBA's loop style unrolls per block: a length with a new block count is a new op sequence, which
    is probed at that signature first, then trusted."""
    m, ref = twins(MobaCore, block_size=16, top_k=2, formulation="loop")
    moec.compile(m)
    with torch.no_grad():
        m(*qkv(N=40))
        seen = len(region_of(m).lifted.fingerprints)
        for N in (60, 61):                                  # 4 blocks: not among the probed lengths
            torch.testing.assert_close(m(*qkv(N=N)), ref(*qkv(N=N)), rtol=1e-4, atol=1e-5)
    assert len(region_of(m).lifted.fingerprints) == seen + 1
    assert region_of(m).calls["kernels"] == 3


def test_short_example_still_probes_the_selection():
    """The first call is short (its top-k count is clamped to 2 blocks): the probe grows the length
    until top-k picks some of the blocks, so long calls later run the kernels."""
    m, ref = twins(MobaCore, block_size=16, top_k=5, formulation="gather")
    moec.compile(m)
    with torch.no_grad():
        m(*qkv(N=20))
        lifted = region_of(m).lifted
        assert lifted is not None and lifted.k_offset == 0 and lifted.config.top_k == 5, m.explain()
        long = qkv(N=200, B=1, H=2, Hkv=1)
        torch.testing.assert_close(m(*long), ref(*long), rtol=1e-4, atol=1e-5)
    assert region_of(m).calls["kernels"] == 2


class ConfiguredMoba(MobaAttention):
    """Reads its block size and top-k from a config object at each call."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(moba_chunk_size=16, moba_topk=3)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, h, self.head_dim).transpose(1, 2)
                   for p, h in ((self.q_proj, self.heads), (self.k_proj, self.kv_heads), (self.v_proj, self.kv_heads)))
        o = FORMULATIONS["dense"](q, k, v, self.config.moba_chunk_size, self.config.moba_topk)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


def test_a_config_attribute_changed_after_compile_is_a_new_graph():
    m, ref = twins(ConfiguredMoba)
    moec.compile(m)
    x = torch.randn(1, 100, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
        for change in (dict(moba_topk=1), dict(moba_chunk_size=32)):
            for mod in (m, ref):
                vars(mod.config).update(change)
            torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
