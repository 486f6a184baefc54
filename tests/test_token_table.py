"""Routing by token id (hash routing): a layer whose experts are a table lookup of the token ids it is given
(``tid2eid[input_ids]``, `moec.spec.RouterConfig.token_table`) is lifted: the table's rows for the call's tokens
are an input of the generated program, the routing kernel weighs them. Also DeepSeek-V4's ``sqrt(softplus)``
scores, and token ids a layer takes but does not route by. Compared with eager copies made before compiling:
outputs and every gradient, under table changes, bad token ids, fp16 and torch.compile."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import moec
import zoo
from moec import reference
from moec.runtime.route_kernel import RouteParams, fused_route
from moec.spec import MoESpecError, RouterConfig


def _pair(factory, seed: int = 0, **kw):
    torch.manual_seed(seed)
    eager = factory(**kw)
    return moec.compile(copy.deepcopy(eager)), eager


def _call(model, x, tokens):
    return model(x, tokens) if isinstance(model, zoo.HashLayerMoE) else model(x, input_ids=tokens)


def _run(model, x, tokens, train: bool):
    model.train(train)
    xg = x.clone().requires_grad_(True)
    y = _call(model, xg, tokens)
    (y.float().square().sum()).backward()
    return y, xg.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want, tol=1e-4):
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = got, want
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    for name, g in dw_ref.items():
        assert (dw[name] is None) == (g is None), name
        if g is not None:
            scale = max(g.abs().max().item(), 1.0)
            torch.testing.assert_close(dw[name], g, rtol=tol, atol=tol * scale, msg=name)


def _calls(model) -> dict:
    region = model.__dict__["_moec_region"]
    return dict(region.calls)


@pytest.mark.parametrize("factory", [zoo.HashRoutedMoE, zoo.HashLayerMoE])
@pytest.mark.parametrize("train", [False, True])
def test_hash_routed_layers_lift_and_every_gradient_matches_eager(factory, train):
    model, eager = _pair(factory)
    x, tokens = torch.randn(2, 7, 16), torch.randint(0, 40, (2, 7))
    _assert_same(_run(model, x, tokens, train), _run(eager, x, tokens, train))
    assert _calls(model)["kernels forward and backward"] == 1 and not any("eager" in c for c in _calls(model))
    assert "choices from a token table" in model.explain()


def test_the_table_rows_are_a_program_input_the_route_kernel_weighs():
    model, _ = _pair(zoo.HashRoutedMoE)
    with torch.no_grad():
        model(torch.randn(1, 3, 16), input_ids=torch.tensor([[1, 2, 3]]))
    region = model.__dict__["_moec_region"]
    c = region.compiled_for(region.recipe, torch.float32, torch.device("cpu"))
    assert "choices" in dict(c.graph.inputs)
    route = next(n for n in c.graph.nodes if n.op == "fused_route")
    assert "choices" in route.ins and route.attr["score"] == "sqrtsoftplus"


@pytest.mark.parametrize("repeat", [True, False])
def test_repeated_choices_run_the_expert_once_per_repeat(repeat):
    model, eager = _pair(zoo.HashRoutedMoE)
    with torch.no_grad():
        for m in (model, eager):        # every token's two choices the same expert, or two different ones
            m.tid2eid.copy_(torch.arange(40)[:, None].expand(40, 2) % 4 if repeat else
                            torch.stack([torch.arange(40) % 4, (torch.arange(40) + 1) % 4], 1))
    x, tokens = torch.randn(3, 5, 16), torch.randint(0, 40, (3, 5))
    _assert_same(_run(model, x, tokens, True), _run(eager, x, tokens, True))


def test_token_ids_by_position_or_keyword_and_every_token_count():
    model, eager = _pair(zoo.HashRoutedMoE)
    with torch.no_grad():
        for shape in ((1, 1), (2, 9), (33,), (0,)):
            x, tokens = torch.randn(*shape, 16), torch.randint(0, 40, shape)
            torch.testing.assert_close(model(x, tokens), eager(x, tokens), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens), rtol=1e-5, atol=1e-5)
    assert set(_calls(model)) == {"kernels"}


def test_a_table_written_or_replaced_after_compile_is_read():
    model, eager = _pair(zoo.HashRoutedMoE)
    x, tokens = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        model(x, input_ids=tokens)
        for m in (model, eager):
            m.tid2eid[tokens.reshape(-1)] = torch.tensor([3, 1])
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens), rtol=1e-5, atol=1e-5)
        fresh = torch.randint(0, 4, (40, 2))
        for m in (model, eager):
            m.tid2eid = fresh.clone()
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens), rtol=1e-5, atol=1e-5)


def test_a_table_with_ids_past_the_experts_runs_eager_and_says_why():
    model, eager = _pair(zoo.HashLayerMoE)
    x, tokens = torch.randn(2, 5, 16), torch.randint(1, 40, (2, 5))
    with torch.no_grad():
        for m in (model, eager):
            m.hash_bin[0] = 7
        torch.testing.assert_close(model(x, tokens), eager(x, tokens))     # (no token 0 here: eager runs)
    assert "holds ids outside [0, 4)" in model.explain()
    with torch.no_grad():
        for m in (model, eager):
            m.hash_bin[0] = 1
        torch.testing.assert_close(model(x, tokens), eager(x, tokens))
    assert _calls(model).get("kernels") == 1


@pytest.mark.parametrize("bad", ["missing", "float", "wrong count"])
def test_bad_token_ids_run_the_eager_forward(bad):
    model, eager = _pair(zoo.HashRoutedMoE)
    x = torch.randn(2, 5, 16)
    tokens = {"missing": None, "float": torch.rand(2, 5) * 30, "wrong count": torch.randint(0, 40, (2, 4))}[bad]

    def outcome(m):
        try:
            with torch.no_grad():
                return m(x, input_ids=tokens)
        except Exception as e:  # noqa: BLE001 - eager's error, whatever it is
            return type(e)
    got, want = outcome(model), outcome(eager)
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want)
    else:
        assert got is want
    assert "routes by token id: input_ids must be integer ids" in model.explain()


def test_token_ids_outside_the_table_raise_as_in_eager():
    model, eager = _pair(zoo.HashRoutedMoE)
    x, tokens = torch.randn(1, 3, 16), torch.tensor([[1, 2, 40]])
    for m in (model, eager):
        with pytest.raises(IndexError):
            m(x, input_ids=tokens)


def test_fp16_forward_matches_eager():
    model, eager = _pair(zoo.HashRoutedMoE)
    model, eager = model.half(), eager.half()
    x, tokens = torch.randn(2, 6, 16).half(), torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens), rtol=2e-2, atol=2e-2)


def test_torch_compile_with_gradients():
    model, eager = _pair(zoo.HashRoutedMoE)
    compiled = torch.compile(model, backend="aot_eager")
    x, tokens = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
    y, dx, _ = _run(compiled, x, tokens, True)
    _assert_same((y, dx, {n: p.grad for n, p in model.named_parameters()}), _run(eager, x, tokens, True))


@given(E=st.integers(2, 6), k=st.integers(1, 3), vocab=st.integers(2, 30), T=st.integers(0, 20),
       seed=st.integers(0, 2 ** 16))
def test_hash_routed_layers_match_eager(E, k, vocab, T, seed):
    k = min(k, E)
    model, eager = _pair(zoo.HashRoutedMoE, seed, E=E, k=k, vocab=vocab)
    g = torch.Generator().manual_seed(seed)
    x, tokens = torch.randn(T, 16, generator=g), torch.randint(0, vocab, (T,), generator=g)
    _assert_same(_run(model, x, tokens, True), _run(eager, x, tokens, True))


# ---- sqrt(softplus) scores; token ids a layer takes and ignores ---------------------------------------

def test_sqrt_softplus_routing_with_token_ids_the_layer_ignores():
    model, eager = _pair(zoo.SqrtSoftplusMoE)
    x, tokens = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
    _assert_same(_run(model, x, tokens, True), _run(eager, x, tokens, True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))
    assert set(_calls(model)) == {"kernels forward and backward", "backward: kernels", "kernels"}
    assert "sqrtsoftplus" in model.explain()


class TokenEmbeddingMoE(zoo.SqrtSoftplusMoE):
    """Reads its token ids otherwise (adds a token embedding): given them, it runs eager."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)

    def forward(self, hidden_states, input_ids=None):
        out = super().forward(hidden_states)
        return out if input_ids is None else out + self.embed(input_ids)


def test_a_layer_reading_its_token_ids_otherwise_runs_eager_when_given_them():
    model, eager = _pair(TokenEmbeddingMoE)
    x, tokens = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens))
        torch.testing.assert_close(model(x), eager(x))
    assert _calls(model) == {"eager: extra forward arguments": 1, "kernels": 1}


# ---- the kernel and the spec ------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("T", [0, 1, 13, 70])
def test_route_kernel_weighs_given_choices(score, T):
    E, k, d = 6, 3, 32
    cfg = RouterConfig(E, k, score=score, renormalize=score != "sigmoid", routed_scaling=1.5, token_table=True)
    g = torch.Generator().manual_seed(T)
    x, w = torch.randn(T, d, generator=g), torch.randn(E, d, generator=g)
    choices = torch.randint(0, E, (T, k), generator=g)
    choices[:2, 1] = choices[:2, 0]                      # repeats
    ids, weights, _ = reference.route(x @ w.t(), cfg, choices=choices)
    for dispatch in (False, True):
        r = fused_route(x, w, RouteParams(router=cfg, hidden=d, choices_in=True), choices=choices, dispatch=dispatch)
        assert torch.equal(r.ids.long(), ids)
        torch.testing.assert_close(r.weights, weights)
        assert torch.equal(r.counts.long(), torch.bincount(ids.reshape(-1), minlength=E))
        if dispatch:
            assert torch.equal(r.order.long(), torch.sort(ids.reshape(-1), stable=True).indices)


def test_route_kernel_names_bad_choices():
    cfg = RouterConfig(4, 2, token_table=True)
    p = RouteParams(router=cfg, hidden=16, choices_in=True)
    x, w = torch.randn(3, 16), torch.randn(4, 16)
    for choices, what in ((None, "required"), (torch.zeros(3, 2), "int32 or int64"), (torch.zeros(3, 1).long(), "shape"),
                          (torch.full((3, 2), 4), r"\[0, 4\)")):
        with pytest.raises(ValueError, match=what):
            fused_route(x, w, p, choices=choices)
    with pytest.raises(ValueError, match="choices was given"):
        fused_route(x, w, RouteParams(router=RouterConfig(4, 2), hidden=16), choices=torch.zeros(3, 2).long())


@pytest.mark.parametrize("extra", [dict(score_bias=True), dict(n_group=2, topk_group=1), dict(noisy=True),
                                   dict(capacity_factor=1.0), dict(aux_loss=True), dict(order="logits_then_score")])
def test_a_token_table_router_only_weighs(extra):
    with pytest.raises(MoESpecError, match="token_table"):
        RouterConfig(4, 2, token_table=True, **extra)


# ---- what the lookup must not hide ------------------------------------------------------------------

class FoldedIdsMoE(zoo.HashRoutedMoE):
    """Reads its ids through the table only after folding them (``% vocab``, ``clamp``) or masks padding:
    not a plain lookup, so it is not lifted (the probe tries ids outside the table and the ids code treats
    apart)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, hidden_states, input_ids=None):
        V = self.tid2eid.shape[0]
        ids = {"mod": lambda t: t % V, "clamp": lambda t: t.clamp(min=0), "pad": lambda t: t}[self.how](input_ids)
        out = super().forward(hidden_states, ids)
        return out * (input_ids != 0)[..., None] if self.how == "pad" else out


@pytest.mark.parametrize("how", ["mod", "clamp", "pad"])
def test_ids_read_other_than_by_a_plain_lookup_keep_the_layer_eager(how):
    model, eager = _pair(FoldedIdsMoE, how=how)
    x, tokens = torch.randn(2, 5, 16), torch.tensor([[0, 5, -1, 45, 7], [1, 2, 3, 39, 100]])
    if how == "clamp":
        tokens = tokens.clamp(max=39)
    if how == "pad":
        tokens = tokens.clamp(0, 39)
    with torch.no_grad():
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens))
    assert "_moec_region" not in model.__dict__ or not model.__dict__["_moec_region"].lifted


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_mask_like_token_ids_run_the_eager_forward(dtype):
    model, eager = _pair(zoo.HashRoutedMoE)
    x, tokens = torch.randn(40, 16), (torch.arange(40) % 13 == 0).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens))
    assert not any(c.startswith("kernels") for c in _calls(model))


def test_a_table_written_through_data_is_checked_on_the_cpu():
    model, eager = _pair(zoo.HashRoutedMoE)
    x, tokens = torch.randn(1, 4, 16), torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        model(x, input_ids=tokens)
        model.tid2eid.data[0, 0] = 4            # no version bump: the rows are checked on the CPU
        eager.tid2eid.data[0, 0] = 4
        for m in (model, eager):
            with pytest.raises(RuntimeError):   # eager's gather of expert 4 of 4 fails, and so does the call
                m(x, input_ids=tokens)
    assert "holds ids outside [0, 4) (read this call)" in model.explain()


class PadMaskMoE(zoo.SqrtSoftplusMoE):
    """Masks padding (id 2) when given ids."""

    def forward(self, hidden_states, input_ids=None):
        out = super().forward(hidden_states)
        return out if input_ids is None else out * (input_ids != 2)[..., None]


class CountingMoE(zoo.SqrtSoftplusMoE):
    """Counts the tokens it sees when given ids (a buffer written)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(40, dtype=torch.long))

    def forward(self, hidden_states, input_ids=None):
        if input_ids is not None:
            self.seen += torch.bincount(input_ids.reshape(-1), minlength=40)
        return super().forward(hidden_states)


@pytest.mark.parametrize("factory", [PadMaskMoE, CountingMoE, TokenEmbeddingMoE])
def test_token_ids_a_layer_reads_are_not_ignored(factory):
    model, eager = _pair(factory)
    if factory is TokenEmbeddingMoE:            # zero at compile (same answer with and without ids), trained later
        with torch.no_grad():
            for m in (model, eager):
                m.embed.weight.zero_()
    model, eager = _pair(lambda: copy.deepcopy(eager))
    x, tokens = torch.randn(2, 5, 16), torch.tensor([[2, 5, 2, 7, 9], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        if factory is TokenEmbeddingMoE:
            for m in (model, eager):
                m.embed.weight.fill_(0.5)
        torch.testing.assert_close(model(x, input_ids=tokens), eager(x, input_ids=tokens))
    if factory is CountingMoE:
        assert torch.equal(model.seen, eager.seen)
    assert model.__dict__["_moec_region"].lifted.ignored_args == ()
