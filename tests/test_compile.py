"""`moec.compile` end to end: every zoo formulation compiled vs its own eager code, the decorator
forms, behaving like the original module, dumps, explain(), bad input, gradients."""
import copy
import json

import pytest
import torch
from torch import nn

import moec
from moec import compiler
from moec.compiler import compile_spec
from moec.runtime.support import why_not_kernels
from moec.runtime import cache

import zoo

LIFTED = {
    "MixtralMoE": lambda: zoo.MixtralMoE(),
    "MixtralSkipEmptyMoE": lambda: zoo.MixtralSkipEmptyMoE(),
    "MixtralTopkSoftmaxMoE": lambda: zoo.MixtralTopkSoftmaxMoE(),
    "MixtralLogitsMoE": lambda: zoo.MixtralLogitsMoE(),
    "StackedSortMoE": lambda: zoo.StackedSortMoE(),
    "StackedGatherBmmMoE": lambda: zoo.StackedGatherBmmMoE(),
    "DenseOneHotMoE": lambda: zoo.DenseOneHotMoE(),
    "DeepseekV3MoE": lambda: zoo.DeepseekV3MoE(),
    "DeepseekV2MoE": lambda: zoo.DeepseekV2MoE(),
    "SwitchMoE": lambda: zoo.SwitchMoE(),
    "QwenMoE": lambda: zoo.QwenMoE(),
    "CapacityMoE": lambda: zoo.CapacityMoE(),
    "AuxLossMoE": lambda: zoo.AuxLossMoE(),
    "BiasedExpertMoE": lambda: zoo.BiasedExpertMoE(),
    "BiasedFusedExpertMoE": lambda: zoo.BiasedFusedExpertMoE(),
    "PlainLinearMoE": lambda: zoo.PlainLinearMoE(),
    "GShardTop2MoE": lambda: zoo.GShardTop2MoE(),
    "WrappedExpertsMoE": lambda: zoo.WrappedExpertsMoE(),
    "STMoE": lambda: zoo.STMoE(),
    "Relu2ExpertMoE": lambda: zoo.Relu2ExpertMoE(),
    "LogitsBiasTopKMoE": lambda: zoo.LogitsBiasTopKMoE(),
    "LogitsZLossMoE": lambda: zoo.LogitsZLossMoE(),
    "IdentityExpertMoE": lambda: zoo.IdentityExpertMoE(),
    "SwitchCapacityMoE": lambda: zoo.SwitchCapacityMoE(),
    "DenseDispatchMoE": lambda: zoo.DenseDispatchMoE(),
    "FairseqTop2MoE": lambda: zoo.FairseqTop2MoE(),
}


def compiled_and_eager(factory, **options):
    torch.manual_seed(0)
    eager = factory().eval()
    compiled = moec.compile(copy.deepcopy(eager), **options)
    return compiled, eager


def assert_same(a, b, tol=1e-4):
    if a is None or b is None:
        assert a is None and b is None
        return
    if isinstance(a, tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v, tol)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", LIFTED)
def test_zoo_module_compiled_matches_eager(name):
    compiled, eager = compiled_and_eager(LIFTED[name])
    report = compiled.explain()
    assert "LIFTED" in report and "EAGER" not in report, report
    for T in (1, 7):
        x = torch.randn(1, T, 16)
        with torch.no_grad():
            assert_same(compiled(x), eager(x))
    region = compiled.__dict__.get("_moec_region")
    assert region is not None and region.calls["kernels"] == 2


@pytest.mark.parametrize("cls", [zoo.BiasedExpertMoE, zoo.BiasedFusedExpertMoE])
def test_expert_biases_train_like_eager(cls):
    """nn.Linear experts with biases: gradients of the biases match eager, and an optimizer step on
    them reaches the kernels."""
    compiled, eager = compiled_and_eager(cls)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (compiled, eager)]
    for step in range(2):
        x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(step))
        for m, opt in zip((compiled, eager), opts):
            opt.zero_grad()
            m(x).square().sum().backward()
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        for opt in opts:
            opt.step()
    with torch.no_grad():
        assert_same(compiled(x), eager(x))
    assert compiled.__dict__["_moec_region"].calls["kernels"] == 1


def test_tuple_outputs_train_like_eager():
    """A layer returning (y, aux loss, z-loss, counts) as a namedtuple: the losses and the counts come
    out as eager's (dtypes too), and gradients through the losses match."""
    compiled, eager = compiled_and_eager(zoo.STMoE)
    assert compiled.__dict__["_moec_region"].lifted.outputs == "y_aux_zloss_counts"
    x = torch.randn(2, 6, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(xa), eager(xb)
    assert type(got) is zoo.STMoEOutput and got.tokens_per_expert.dtype == want.tokens_per_expert.dtype
    assert_same(got, want)
    for out in (got, want):
        (out.hidden_states.square().sum() + out.aux_loss + 0.1 * out.z_loss).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.__dict__["_moec_region"].calls["kernels forward and backward"] == 1


def test_model_with_two_moe_layers_and_other_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 16)
            self.moe1 = zoo.MixtralMoE()
            self.mlp = zoo.DenseMLP()
            self.moe2 = zoo.DeepseekV3MoE()

        def forward(self, x):
            return self.moe2(self.mlp(self.moe1(self.inp(x))))

    compiled, eager = compiled_and_eager(Net)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same(compiled(x), eager(x))
    report = compiled.explain()
    assert "moe1 (MixtralMoE)" in report and "moe2 (DeepseekV3MoE)" in report


def test_decorator_forms_and_function(tmp_path):
    @moec.compile
    class A(zoo.MixtralMoE):
        pass

    @moec.compile(dump_dir=tmp_path / "b", arch="sm80")
    class B(zoo.MixtralMoE):
        pass

    torch.manual_seed(0)
    a, b = A(), B()
    assert isinstance(a, zoo.MixtralMoE) and "LIFTED" in a.explain() and "LIFTED" in b.explain()
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        ya = a(x)
        with moec.disabled():
            assert_same(ya, a(x))
        b(x)
    assert any((tmp_path / "b").rglob("*.sm80/tiles.json"))

    def run(layer, x):
        return layer(x) * 2

    f = moec.compile(run)
    assert "not been called" in f.explain()
    layer = zoo.StackedSortMoE()
    with torch.no_grad():
        y = f(layer, x)
        with moec.disabled():
            assert_same(y, run(layer, x))
    assert "LIFTED" in f.explain()

    torch.manual_seed(1)
    inner = zoo.DenseOneHotMoE()
    eager = copy.deepcopy(inner)

    @moec.compile
    def residual(x):                     # reaches its MoE layer through the closure
        return x + inner(x)

    with torch.no_grad():
        assert_same(residual(x), x + eager(x))
    assert "LIFTED" in residual.explain() and inner.__dict__["_moec_region"].calls["kernels"] == 1


def test_behaves_like_the_original():
    torch.manual_seed(0)
    model = zoo.MixtralMoE()
    keys = list(model.state_dict())
    params = list(model.parameters())
    compiled = moec.compile(model)
    assert compiled is model and isinstance(compiled, zoo.MixtralMoE)
    assert list(compiled.state_dict()) == keys and list(compiled.parameters()) == params
    compiled.load_state_dict(copy.deepcopy(compiled.state_dict()))
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        y1 = compiled(x)
        compiled.experts[0].w1.weight.mul_(3.0)            # weight updates are seen
        compiled.gate.weight.add_(0.5)
        y2 = compiled(x)
        with moec.disabled():
            assert_same(y2, compiled(x))
    assert not torch.allclose(y1, y2)
    half = compiled.to(torch.float16).eval()               # .to() and .eval() keep working
    with torch.no_grad():
        yh = half(x.half())
        with moec.disabled():
            assert_same(yh, half(x.half()), tol=2e-2)
    assert half.__dict__["_moec_region"].calls["kernels"] >= 1


def test_one_compile_serves_every_token_count():
    compiled, eager = compiled_and_eager(LIFTED["MixtralMoE"])
    with torch.no_grad():
        compiled(torch.randn(1, 1, 16))
        misses, modules = compiler.cache_info().misses, set(cache._modules)
        for T in (1, 7, 300):
            x = torch.randn(1, T, 16)
            assert_same(compiled(x), eager(x))
    # no compile again; the only kernels loaded since are the tile schedule's the program lists among its
    # steps' helpers (first launched past the routing kernel's one-program token counts)
    (program,) = [c.program for c in compiled.__dict__["_moec_region"].compiled.values()]
    helpers = {cache.source_key(k.source) for step in program.steps for k in step.helpers}
    assert compiler.cache_info().misses == misses and {key for key, _ in set(cache._modules) - modules} <= helpers
    assert len(compiled.__dict__["_moec_region"].compiled) == 1


def test_dump_dir_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_DUMP_DIR", str(tmp_path))
    compiled, _ = compiled_and_eager(LIFTED["QwenMoE"])
    with torch.no_grad():
        compiled(torch.randn(1, 5, 16))
    (region,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = {p.name for p in region.iterdir()}
    assert {"captured.txt", "tiles.json", "launches.json", "kernels"} <= names
    assert any(n.endswith("fuse-routing.txt") for n in names) and any(n.endswith("choose-tiles.txt") for n in names)
    kernels = list((region / "kernels").glob("*.py"))
    assert len(kernels) >= 4
    for k in kernels:
        head = k.read_text().splitlines()[:6]
        assert any("IR node:" in line for line in head), head
    launches = json.loads((region / "launches.json").read_text())
    assert launches["T"] == 5 and len(launches["launches"]) >= 4
    assert "LIFTED" in (tmp_path / "explain.txt").read_text()


def test_explain_names_what_stays_eager():
    torch.manual_seed(0)
    for bad in (zoo.TanhExpertMoE(), zoo.PartialBiasExpertMoE()):
        eager = copy.deepcopy(bad)
        compiled = moec.compile(bad)
        report = compiled.explain()
        assert "EAGER" in report and type(bad).__name__ in report, report
        x = torch.randn(1, 6, 16)
        with torch.no_grad():
            assert_same(compiled(x), eager(x))
    dense = moec.compile(zoo.DenseMLP())
    assert "no MoE layer found" in dense.explain()


@pytest.mark.parametrize("cls, words", [
    (zoo.ProductKeyMoE, ("64 rank-one experts", "down_embed, up_embed", "query scores two sets of 8 keys",
                         "product-key retrieval experts are not supported")),
])
def test_explain_says_in_words_why_a_module_with_experts_is_not_read(cls, words):
    compiled, eager = compiled_and_eager(cls)
    line = next(ln for ln in compiled.explain().splitlines() if ln.strip().startswith("EAGER"))
    assert cls.__name__ in line and all(w in line for w in words), line
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same(compiled(x), eager(x))


def test_bad_input():
    compiled, eager = compiled_and_eager(LIFTED["MixtralMoE"])
    with pytest.raises(ValueError, match="hidden size 16"):
        compiled(torch.randn(1, 3, 15))
    region = compiled.__dict__["_moec_region"]
    with torch.no_grad():
        x64 = torch.randn(1, 3, 16, dtype=torch.float64)       # runs eager, correctly, and says so
        assert_same(compiled.double()(x64), eager.double()(x64))
        compiled.float(), eager.float()
        xb = torch.randn(1, 3, 16, dtype=torch.bfloat16)
        assert_same(compiled.bfloat16()(xb), eager.bfloat16()(xb), tol=2e-2)
        compiled.float(), eager.float()
        x = torch.randn(1, 4, 16)
        x[0, 2] = float("nan")
        y = compiled(x)[0]
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    calls = " ".join(region.calls)
    assert "float64" in calls and "bfloat16 on CPU" in calls
    assert "float64" in compiled.explain()


def test_gradients_flow_through_compiled_forward():
    compiled, eager = compiled_and_eager(LIFTED["DeepseekV3MoE"])
    compiled.train(), eager.train()
    x = torch.randn(2, 5, 16)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc), eager(xe)
    assert_same(yc.detach(), ye.detach())
    g = torch.randn_like(ye)
    yc.backward(g)
    ye.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-4)
    for (n, pc), (_, pe) in zip(compiled.named_parameters(), eager.named_parameters()):
        if pe.grad is None:
            assert pc.grad is None or not pc.grad.any(), n
        else:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=n)
    assert compiled.__dict__["_moec_region"].calls["kernels forward and backward"] == 1
    assert "backward" in compiled.explain()


def test_noisy_gating_in_training_matches_eager_draws():
    compiled, eager = compiled_and_eager(lambda: zoo.NoisyTopKMoE())
    assert "LIFTED" in compiled.explain(), compiled.explain()
    compiled.train(), eager.train()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        torch.manual_seed(123)
        yc = compiled(x)
        torch.manual_seed(123)
        ye = eager(x)
        assert_same(yc, ye)
        compiled.eval(), eager.eval()
        assert_same(compiled(x), eager(x))


def test_noisy_gating_follows_dtype_changes():
    compiled, eager = compiled_and_eager(lambda: zoo.NoisyTopKMoE())
    compiled.half().train(), eager.half().train()
    x = torch.randn(1, 6, 16).half()
    with torch.no_grad():
        torch.manual_seed(7)
        yc = compiled(x)
        torch.manual_seed(7)
        ye = eager(x)
    assert_same(yc, ye, tol=2e-2)


def test_inputs_the_kernels_cannot_take_are_named():
    compiled, _ = compiled_and_eager(LIFTED["MixtralMoE"])
    region = compiled.__dict__["_moec_region"]
    tensors = region.lifted.param_tensors(compiled)
    def why_eager(x, ts):
        return why_not_kernels(x, ts, fp32_ok=True)
    assert "device meta" in why_eager(torch.empty(2, 16, device="meta"), tensors)
    assert "not a tensor" in why_eager([1.0] * 16, tensors)
    assert "int64" in why_eager(torch.zeros(2, 16, dtype=torch.int64), tensors)
    halves = [t.half() for t in tensors]
    assert "weights in torch.float16" in why_eager(torch.randn(2, 16), halves)
    assert why_eager(torch.randn(2, 16), tensors) is None


def test_a_wider_router_named_linear_beside_the_router_changes_nothing():
    """A layer returning (y, router logits) that also holds an unused linear named like a router with more
    outputs than experts: the router with one output per expert is read (a wider one only stands for identity
    experts when no such router exists), and the layer lifts with eager's outputs."""
    class WithSpareHead(zoo.MixtralLogitsMoE):
        def __init__(self):
            super().__init__()
            self.aux_router = torch.nn.Linear(16, 2 * len(self.experts), bias=False)
    compiled, eager = compiled_and_eager(WithSpareHead)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same(compiled(x), eager(x))
    assert "LIFTED" in compiled.explain() and "gate.weight" in compiled.explain()


def test_a_decoder_block_with_stacked_experts_on_itself_says_why():
    """Attention, a router and stacked expert weights directly on one block: eager, with the reason in words
    (not an error of the analysis)."""
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self, d=16, f=32, E=4):
            super().__init__()
            self.self_attn = torch.nn.MultiheadAttention(d, 2, batch_first=True)
            self.gate = torch.nn.Linear(d, E, bias=False)
            self.w1, self.w3 = (torch.nn.Parameter(torch.randn(E, f, d) * 0.1) for _ in range(2))
            self.w2 = torch.nn.Parameter(torch.randn(E, d, f) * 0.1)

        def forward(self, h):
            h = h + self.self_attn(h, h, h)[0]
            x = h.reshape(-1, h.shape[-1])
            w, ids = torch.topk(F.softmax(self.gate(x), -1), 2)
            y = torch.zeros_like(x)
            for s in range(2):
                e = ids[:, s]
                up, g = (torch.einsum("td,tfd->tf", x, p[e]) for p in (self.w1, self.w3))
                y = y + w[:, s:s + 1] * torch.einsum("tf,tdf->td", F.silu(up) * g, self.w2[e])
            return h + y.view_as(h)
    compiled, eager = compiled_and_eager(Block)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same(compiled(x), eager(x))
    line = next(ln for ln in compiled.explain().splitlines() if "EAGER" in ln)
    assert "also computes self_attn (MultiheadAttention)" in line and "analysis failed" not in line, line


def test_hash_routing_by_token_ids_says_why():
    """A layer routing by arithmetic on the token ids (no table of the layer to look them up in: a table is lifted,
    tests/test_token_table.py): eager, and the reason names the token ids and the table it looked for."""
    class HashMoE(zoo.MixtralMoE):
        def forward(self, hidden_states, input_ids=None):
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            ids = (input_ids.reshape(-1, 1) * 7 + torch.arange(self.top_k)) % len(self.experts)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                tok = (ids == e).any(-1).nonzero().flatten()
                out.index_add_(0, tok, expert(x[tok]) / self.top_k)
            return out.view_as(hidden_states)
    compiled, eager = compiled_and_eager(HashMoE)
    x, ids = torch.randn(2, 5, 16), torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert_same(compiled(x, input_ids=ids), eager(x, input_ids=ids))
    line = next(ln for ln in compiled.explain().splitlines() if "EAGER" in ln)
    assert "needs input_ids" in line and "table[input_ids]" in line, line


class InputScaledMoE(torch.nn.Module):
    """Llama4's way: top-1 by logit, the sigmoid of the pick scales the experts' *input*, every expert runs
    on every token (a zero input gives a zero output), stacked [E, d, 2f] / [E, f, d] weights."""

    def __init__(self, d=16, f=24, E=4):
        super().__init__()
        self.router = torch.nn.Linear(d, E, bias=False)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, d, 2 * f) / 4)
        self.down_proj = torch.nn.Parameter(torch.randn(E, f, d) / 5)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(x)
        top, idx = torch.topk(logits, 1, dim=1)
        scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, idx, top))
        routed_in = x.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
        gate, up = torch.bmm(routed_in.view(scores.shape[1], -1, x.shape[-1]), self.gate_up_proj).chunk(2, dim=-1)
        out = torch.bmm(torch.nn.functional.silu(gate) * up, self.down_proj)
        return out.sum(0).view_as(hidden_states)


def test_input_scaled_experts_are_lifted():
    """Experts that see the routing weight times the input (Llama4, every expert on every row) are lifted as
    input-scaled experts: the same outputs and gradients as eager, on the kernels."""
    compiled, eager = compiled_and_eager(InputScaledMoE)
    assert "seeing weight * x (input-scaled)" in compiled.explain(), compiled.explain()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same(compiled(x), eager(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xa).square().sum().backward()
    eager(xb).square().sum().backward()
    assert_same(xa.grad, xb.grad)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled._moec_region.calls["kernels forward and backward"] == 1


@pytest.mark.parametrize("name", ["MixtralMoE", "DenseOneHotMoE", "QwenMoE"])
def test_input_scaling_is_not_seen_where_the_weights_scale_the_output(name):
    """Must not fire: layers whose traces reach the experts (module calls, matmuls with the stacked weights)
    and weight the experts' outputs, or gather their inputs, are not input-scaled."""
    from moec.frontend.fx_ops import MATMULS
    from moec.frontend.formulation import scaled_expert_input
    from moec.frontend.structure import discover
    from moec.frontend.trace import trace_partial
    torch.manual_seed(0)
    m = LIFTED[name]().eval()
    st = discover(m)
    cap = trace_partial(m, [m.get_submodule(p) for p in st.expert_paths + st.shared])
    stacked = {p for p, _ in st.stacked}
    weight = lambda a: a.op == "get_attr" and a.target in stacked          # noqa: E731
    reached = [n for n in cap.graph.nodes if (n.op == "call_module" and n.target in set(st.expert_paths))
               or (cap.kind(n) in MATMULS and any(weight(a) for a in n.all_input_nodes))]
    assert reached, "the trace never reaches the experts: the check would be vacuous"
    paths = {r.module for r in st.routers if r.module} | {r.weight for r in st.routers}
    assert scaled_expert_input(cap, st, paths) is None


def test_embedding_tables_of_a_model_are_no_product_key_experts():
    """A byte-level model with two 256-row tables and a 32-way head is a model, not a layer of product-key
    experts: its MoE and MoBA layers are lifted and nothing is reported about product keys."""
    import moba_zoo

    class ByteLM(torch.nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(256, d), torch.nn.Embedding(256, d)
            self.block = moba_zoo.Block(d=d)
            self.moe = zoo.MixtralMoE(d=d)
            self.head = torch.nn.Linear(d, 32)

        def forward(self, ids):
            h = self.block(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))
            return self.head(h + self.moe(h))
    compiled, eager = compiled_and_eager(ByteLM)
    ids = torch.randint(0, 256, (1, 70))
    with torch.no_grad():
        assert_same(compiled(ids), eager(ids))
    text = compiled.explain()
    assert "LIFTED  moe (MixtralMoE)" in text and "LIFTED  block.attn (MobaAttention)" in text, text
    assert "product" not in text, text
