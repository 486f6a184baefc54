"""Experts whose input the routing weight scales (Llama 4: ``y = sum_s down(act(gate(w_s x)) * up(w_s x))``,
every expert run on ``weight * x`` in eager code) are lifted as ``MoESpec.input_scaled``: the scale is taken on
the gate/up GEMM's accumulators, the combine is a plain sum, the backward's activation epilogue gives the
weights' gradient. Compared with eager copies made before compiling: outputs and every gradient."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moec
import zoo


def _pair(factory, seed: int = 0):
    torch.manual_seed(seed)
    eager = factory()
    return moec.compile(copy.deepcopy(eager)), eager


def _grads(model, x, train: bool):
    model.train(train)
    xg = x.clone().requires_grad_()
    out = model(xg)
    y = out[0] if isinstance(out, tuple) else out
    (y.float().square().sum() + (out[1].float().sum() if isinstance(out, tuple) else 0)).backward()
    return y.detach(), xg.grad, {n: p.grad for n, p in model.named_parameters()}


@settings(deadline=None)
@given(k=st.sampled_from([1, 2]), E=st.sampled_from([4, 8]), B=st.integers(1, 3), S=st.integers(1, 9),
       train=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_reference_style_llama4_matches_eager(k, E, B, S, train, seed):
    """The reference code's way (a ``[d, E]`` router, rows gathered per expert, ``bmm`` experts, ``scatter_add``
    onto the shared expert): the same outputs and gradients, the forward and backward on the kernels."""
    model, eager = _pair(lambda: zoo.GatherScaledMoE(E=E, k=k), seed % 7)
    assert "seeing weight * x (input-scaled)" in model.explain(), model.explain()
    x = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(seed))
    y, dx, dw = _grads(model, x, train)
    y_ref, dx_ref, dw_ref = _grads(eager, x, train)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name, g in dw_ref.items():
        torch.testing.assert_close(dw[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert model._moec_region.calls["kernels forward and backward"] == 1


def test_fp16_forward_matches_eager():
    model, eager = _pair(lambda: zoo.GatherScaledMoE(E=8, k=2).half())
    x = torch.randn(2, 7, 16).half()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=2e-3, atol=2e-3)
    assert model._moec_region.calls["kernels"] == 1


def test_weights_changed_after_compiling_are_read():
    model, eager = _pair(zoo.GatherScaledMoE)
    with torch.no_grad():
        for m in (model, eager):
            m.w3.mul_(-1.5)
            m.router_DE.add_(0.3)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)


# ---- Llama 4 in transformers ----------------------------------------------------------------------

def _llama4(**config):
    transformers = pytest.importorskip("transformers")
    import hf_sweep
    if "llama4_text" not in hf_sweep.families():
        pytest.skip("no llama4_text in this transformers")
    del transformers
    eager = hf_sweep.build("llama4_text", num_hidden_layers=2, **config)
    return moec.compile(copy.deepcopy(eager)), eager


def test_llama4_blocks_lifted_with_logits_generate_and_gradients():
    """Llama4TextMoe (returns ``[T, d]`` and the router logits for a ``[B, S, d]`` input): lifted; logits,
    greedy generation and every parameter's gradient equal eager's."""
    model, eager = _llama4()
    blocks = [m for m in model.modules() if type(m).__name__ == "Llama4TextMoe"]
    assert blocks and all("_moec_region" in m.__dict__ for m in blocks), model.explain()
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=2e-4, atol=2e-4)
        gen = model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert gen.tolist() == eager.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0).tolist()
    for m in (model, eager):
        m.train()
        m(input_ids=ids).logits.float().square().mean().backward()
    got = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert all(m._moec_region.calls["kernels forward and backward"] >= 1 for m in blocks)


def test_llama4_block_under_fullgraph_torch_compile():
    """The block's ``[T, d]`` output (not the input's shape) is what the custom op says it returns."""
    model, eager = _llama4()
    block, ref = model.model.layers[0].feed_forward, eager.model.layers[0].feed_forward
    x = torch.randn(2, 5, block.hidden_dim)
    with torch.no_grad():
        got = torch.compile(block, fullgraph=True, backend="eager")(x)
        want = ref(x)
    assert got[0].shape == want[0].shape == (10, block.hidden_dim)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- what must not be read as input-scaled or as a [T, d] output ----------------------------------------

class MaskedInputMoE(torch.nn.Module):
    """Every expert on every token, its input masked 0/1 to the tokens that picked it, its output weighted: the
    input is multiplied by a router-derived value, but the weights scale the output (lifted as such)."""

    def __init__(self, d=16, f=24, E=4, k=2):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d, E, bias=False)
        self.experts = torch.nn.ModuleList([zoo.MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def forward(self, x):
        xf = x.view(-1, x.shape[-1])
        probs = torch.softmax(self.gate(xf), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        mask = torch.zeros_like(probs).scatter(1, ids, 1.0)
        wd = torch.zeros_like(probs).scatter(1, ids, w)
        y = torch.zeros_like(xf)
        for e, ex in enumerate(self.experts):
            y = y + ex(xf * mask[:, e:e + 1]) * wd[:, e:e + 1]
        return y.view_as(x)


def test_a_masked_input_with_weighted_outputs_is_lifted_as_output_weighted():
    model, eager = _pair(MaskedInputMoE)
    assert "LIFTED" in model.explain() and "input-scaled" not in model.explain(), model.explain()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)


class SqueezeMoE(zoo.MixtralMoE):
    def forward(self, hidden_states):
        return super().forward(hidden_states).squeeze(0)       # [T, d] for a batch of one only


def test_a_forward_that_drops_a_batch_of_one_is_not_read_as_a_flat_output():
    """y's shape is checked on every probe input: [T, d] for a batch of one, [B, S, d] otherwise is no rule the
    kernels follow, so the layer stays eager (and answers as eager in every shape)."""
    model, eager = _pair(SqueezeMoE)
    assert "EAGER" in model.explain() and "returns y of shape" in model.explain(), model.explain()
    for shape in [(1, 5, 16), (2, 5, 16)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(model(x), eager(x))
