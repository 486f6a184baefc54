"""Children moec does not read are called as the forward calls them (by PyTorch: their hooks, their autograd):
routers that are no single linear (a small MLP, a repository's own router that normalises its input) are
external routers (``MoESpec.external_router``: the kernels route their logits), and shared experts the kernels do
not compute (one with a norm of its own, another activation than the routed experts') are external shared experts
(``MoEWeights.shared``: added to the kernels' output). Compared with eager copies made before compiling: outputs
and every gradient, under state changes, hooks, torch.compile and a save/load."""
import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moec
import zoo

MODELS = {"MLPRouterMoE": zoo.MLPRouterMoE, "TanhRouterMoE": zoo.TanhRouterMoE, "NormedRouterMoE": zoo.NormedRouterMoE}
SHARED = {"NormedSharedMoE": zoo.NormedSharedMoE, "GeluSharedMoE": zoo.GeluSharedMoE}


def _pair(factory, seed: int = 0):
    torch.manual_seed(seed)
    eager = factory()
    return moec.compile(copy.deepcopy(eager)), eager


def _loss(out):
    y = out[0] if isinstance(out, tuple) else out
    return y.float().square().sum() + (3 * out[1].float().sum() if isinstance(out, tuple) else 0)


def _run(model, x, train: bool, grads: bool = True):
    model.train(train)
    xg = x.clone().requires_grad_(grads)
    torch.manual_seed(5)                # a router with dropout draws the same masks in both
    out = model(xg)
    if grads:
        _loss(out).backward()
    return out, xg.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_close(a, b, tol=1e-4):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_close(u, v, tol)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _assert_same_grads(got, want, tol=1e-4):
    (out, dx, dw), (out_ref, dx_ref, dw_ref) = got, want
    _assert_close(out, out_ref, tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    for name, g in dw_ref.items():
        assert (dw[name] is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(dw[name], g, rtol=tol, atol=tol * max(1.0, g.abs().max().item()), msg=name)


def _kernels(model) -> dict:
    return dict(model._moec_region.calls)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [False, True])
def test_lifted_and_every_gradient_matches_eager(name, train):
    """The router's parameters get their gradients through autograd of its own call, the experts' from the
    backward kernels, and the input's from both."""
    model, eager = _pair(MODELS[name])
    report = model.explain()
    assert "LIFTED" in report and "logits from its own router module (run by PyTorch)" in report, report
    assert "called as the forward calls it: an external router" in report, report
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    _assert_same_grads(_run(model, x, train), _run(eager, x, train))
    assert _kernels(model) == {"kernels forward and backward": 1, "backward: kernels": 1}


def test_the_route_is_a_generated_kernel_reading_the_logits():
    """No torch step routes: the routing kernel reads the router's logits (no GEMM), so calls can be captured."""
    model, _ = _pair(zoo.MLPRouterMoE)
    with torch.no_grad():
        model(torch.randn(1, 3, 16))
    report = model.explain()
    assert "torch steps (not generated kernels)" not in report.split("backward compiled")[0], report
    region = model._moec_region
    (c,) = region.compiled.values()
    kernels = [k.fn_name for _, k in c.program.kernels()]
    assert any(n.startswith("moec_route_softmax_e4_k2_given") for n in kernels), kernels
    assert c.program.graph_safe


@settings(deadline=None)
@given(E=st.integers(2, 8), k=st.integers(1, 3), width=st.sampled_from([8, 24]), B=st.integers(1, 3),
       S=st.integers(0, 9), train=st.booleans(), norm=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_mlp_routers_match_eager(E, k, width, B, S, train, norm, seed):
    """Any E, k, router width and token count (0 too), renormalised or not, both modes."""
    k = min(k, E)

    def make():
        m = zoo.MixtralMoE(16, 24, E, k, norm_topk_prob=norm)
        m.gate = zoo.MLPRouter(16, E, width)
        return m
    model, eager = _pair(make, seed % 11)
    x = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(seed))
    _assert_same_grads(_run(model, x, train), _run(eager, x, train))
    assert "kernels forward and backward" in _kernels(model) or S == 0     # (no tokens with gradients: eager)


def test_fp16_forward_matches_eager():
    model, eager = _pair(lambda: zoo.NormedRouterMoE().half())
    x = torch.randn(2, 9, 16).half()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=2e-3, atol=2e-3)
    assert _kernels(model) == {"kernels": 1}


def test_router_weights_trained_or_written_are_read():
    model, eager = _pair(zoo.TanhRouterMoE)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager)]
    x = torch.randn(2, 6, 16)
    for _ in range(3):
        for m, opt in zip((model, eager), opts):
            opt.zero_grad()
            _loss(m(x)).backward()
            opt.step()
    with torch.no_grad():
        for m in (model, eager):
            m.router[0].weight.mul_(-2.0)
        _assert_close(model(x), eager(x))
    assert _kernels(model)["kernels forward and backward"] == 3 and _kernels(model)["kernels"] == 1


def test_a_replaced_router_is_lifted_again_or_runs_eager():
    model, eager = _pair(zoo.MLPRouterMoE)
    x = torch.randn(2, 5, 16)
    torch.manual_seed(3)
    other = zoo.MLPRouter(16, 4, 12)
    model.gate, eager.gate = other, copy.deepcopy(other)
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    model.gate = eager.gate = nn.Linear(16, 4, bias=False)     # now a plain linear router
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    report = model.explain()
    assert "lifted again" in report and _kernels(model)["kernels"] == 2, report


def test_hooks_on_the_router_see_one_call_and_may_change_its_output():
    """The router runs once per call, as in eager; a hook that rewrites its output rewrites the routing."""
    model, eager = _pair(zoo.MLPRouterMoE)
    seen = {id(model): [], id(eager): []}
    for m in (model, eager):
        m.gate.register_forward_hook(lambda mod, args, out, key=id(m): seen[key].append(out.detach().clone()))
        m.gate.fc2.register_forward_hook(lambda mod, args, out: out * 3.0)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    assert len(seen[id(model)]) == len(seen[id(eager)]) == 1
    torch.testing.assert_close(seen[id(model)][0].reshape(-1, 4), seen[id(eager)][0].reshape(-1, 4))
    assert _kernels(model) == {"kernels": 1}


def test_a_router_with_dropout_draws_as_eager_in_training():
    def make():
        m = zoo.MixtralMoE(16, 24, 4, 2)
        m.gate = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 20), nn.GELU(), nn.Linear(20, 4))
        return m
    model, eager = _pair(make)
    assert "mode runs eager" not in model.explain(), model.explain()       # confirmed in both modes
    x = torch.randn(2, 6, 16)
    for train in (True, False):
        _assert_same_grads(_run(model, x, train), _run(eager, x, train))


def test_a_router_with_batch_norm_is_left_as_found_and_trains_eager():
    """The probe calls the router on copies with its buffers restored, so compiling changes no running
    statistic; training mode (where the norm writes them, and fails on one token) runs eager, eval on kernels."""
    def make():
        m = zoo.MixtralMoE(16, 24, 4, 2)
        m.gate = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 20), nn.GELU(), nn.Linear(20, 4))
        with torch.no_grad():
            m.gate[0].running_mean.normal_()
            m.gate[0].running_var.uniform_(0.5, 2.0)
        return m.eval()
    model, eager = _pair(make)
    for k, v in eager.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "training mode runs eager" in model.explain(), model.explain()
    x = torch.randn(2, 6, 16)
    for train in (False, True, False):
        _assert_same_grads(_run(model, x, train), _run(eager, x, train))
    for k, v in eager.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert _kernels(model)["kernels forward and backward"] == 2


def test_fullgraph_torch_compile_with_gradients():
    model, eager = _pair(zoo.TanhRouterMoE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16)
    out, dx, _ = _run(compiled, x, True)
    _assert_same_grads((out, dx, {n: p.grad for n, p in model.named_parameters()}), _run(eager, x, True))


def test_saved_and_loaded_state_gives_the_same_answers():
    model, eager = _pair(zoo.NormedRouterMoE)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = zoo.NormedRouterMoE()
    fresh.load_state_dict(torch.load(buf))
    fresh = moec.compile(fresh)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _assert_close(fresh(x), eager(x))
        _assert_close(model(x), eager(x))
    assert _kernels(fresh) == {"kernels": 1}


class WideRouterMoE(zoo.MixtralMoE):
    """A router network whose last layer gives more logits than there are experts (it also scores something
    else): no external router of E outputs, so it stays eager and says why."""

    def __init__(self):
        super().__init__(16, 24, 4, 2)
        self.gate = nn.Sequential(nn.Linear(16, 20), nn.Tanh())
        self.gate_out = nn.Parameter(torch.randn(20, 4) / 5)

    def route(self, hidden_states):
        logits = self.gate(hidden_states) @ self.gate_out
        weights = torch.softmax(logits, dim=1, dtype=torch.float)
        weights, ids = torch.topk(weights, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden_states.dtype), ids


def test_a_router_network_moec_cannot_call_stays_eager_with_its_reason():
    model, eager = _pair(WideRouterMoE)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    assert "EAGER" in model.explain(), model.explain()


# ---- external shared experts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SHARED))
@pytest.mark.parametrize("train", [False, True])
def test_external_shared_experts_lift_and_every_gradient_matches_eager(name, train):
    model, eager = _pair(SHARED[name])
    report = model.explain()
    assert "LIFTED" in report and "(an external shared expert)" in report, report
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    _assert_same_grads(_run(model, x, train), _run(eager, x, train))
    assert _kernels(model) == {"kernels forward and backward": 1, "backward: kernels": 1}


def test_an_external_shared_expert_with_an_external_router_in_fp16():
    def make():
        m = zoo.GeluSharedMoE()
        m.gate = zoo.MLPRouter(16, 4)
        return m.half()
    model, eager = _pair(make)
    x = torch.randn(2, 9, 16).half()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=2e-3, atol=2e-3)
    assert _kernels(model) == {"kernels": 1}


def test_hooks_on_an_external_shared_expert_run_once_and_a_replaced_one_is_read():
    model, eager = _pair(zoo.NormedSharedMoE)
    calls = []
    model.shared_experts.register_forward_hook(lambda mod, args, out: calls.append(1))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    assert calls == [1] and _kernels(model) == {"kernels": 1}
    torch.manual_seed(4)
    other = zoo.RMSNormedMLP(16, 24)
    model.shared_experts, eager.shared_experts = other, copy.deepcopy(other)
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    assert _kernels(model)["kernels"] == 2, model.explain()


# ---- called as the forward calls them ---------------------------------------------------------------------------

class TemperatureRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, temperature=None):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out if temperature is None else out / temperature


class TemperatureRouterMoE(zoo.MixtralMoE):
    """The forward passes a buffer of the layer as the router's second argument."""

    def __init__(self):
        super().__init__(16, 32, 4, 2)
        self.gate = TemperatureRouter()
        self.register_buffer("temperature", torch.tensor(1.0))

    def route(self, hidden_states):
        logits = self.gate(hidden_states, self.temperature)
        weights = torch.softmax(logits, dim=1, dtype=torch.float)
        weights, ids = torch.topk(weights, self.top_k, dim=-1)
        return logits, (weights / weights.sum(-1, keepdim=True)).to(hidden_states.dtype), ids


def test_a_router_gets_the_arguments_the_forward_passes_it():
    model, eager = _pair(TemperatureRouterMoE)
    x = torch.randn(2, 5, 16)
    for value in (1.0, 0.05):
        for m in (model, eager):
            m.temperature.fill_(value)
        with torch.no_grad():
            _assert_close(model(x), eager(x))
    assert _kernels(model) == {"kernels": 2}


class Centred(nn.Module):
    """Not row-wise: it centres its rows over the second-last dim."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = self.down(torch.nn.functional.gelu(self.up(x)))
        return h - h.mean(-2, keepdim=True)


class FlatCentredSharedMoE(zoo.MixtralMoE):
    """The forward calls its shared expert on the flattened rows (so it centres over every token)."""

    def __init__(self):
        super().__init__(16, 32, 4, 2)
        self.shared_expert = Centred()

    def forward(self, hidden_states):
        B, S, d = hidden_states.shape
        return super().forward(hidden_states) + self.shared_expert(hidden_states.reshape(-1, d)).reshape(B, S, d)


def test_children_get_their_input_in_the_shape_the_forward_gives_it():
    """A shared expert called on the rows gets the rows; a router hook sees what eager's sees."""
    model, eager = _pair(FlatCentredSharedMoE)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    assert _kernels(model) == {"kernels": 1}
    model, eager = _pair(zoo.MLPRouterMoE)
    shapes = {id(model): [], id(eager): []}
    for m in (model, eager):
        m.gate.register_forward_hook(lambda mod, args, out, key=id(m): shapes[key].append(tuple(args[0].shape)))
    with torch.no_grad():
        _assert_close(model(x), eager(x))
    assert shapes[id(model)] == shapes[id(eager)] == [(10, 16)]


class RouterTwiceMoE(zoo.MLPRouterMoE):
    def route(self, hidden_states):
        self.gate(hidden_states)                # a second call (its hooks and random draws count)
        return super().route(hidden_states)


class CountingRouter(zoo.MLPRouter):
    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


class DetachedRouterMoE(zoo.MLPRouterMoE):
    def route(self, hidden_states):
        return super().route(hidden_states.detach())     # a stop-gradient router


class ScaledInputRouterMoE(zoo.MLPRouterMoE):
    """The router reads the hidden states times a learned scale (ones when compiled: equal to them, not them)."""

    def __init__(self):
        super().__init__()
        self.router_scale = nn.Parameter(torch.ones(16))

    def route(self, hidden_states):
        return super().route(hidden_states * self.router_scale)


@pytest.mark.parametrize("case", ["twice", "counting", "detached", "scaled"])
def test_children_moec_cannot_call_as_the_forward_does_keep_the_layer_eager(case):
    """A router the forward calls twice, one that counts its calls in an attribute, one fed detached hidden
    states, one fed a product that equals them when compiled: one call on the hidden states under autograd
    would differ, so the layer runs eager (the compile leaves it as found)."""
    def make():
        if case == "counting":
            m = zoo.MLPRouterMoE()
            m.gate = CountingRouter(16, 4)
            return m
        return {"twice": RouterTwiceMoE, "detached": DetachedRouterMoE, "scaled": ScaledInputRouterMoE}[case]()
    model, eager = _pair(make)
    assert "LIFTED" not in model.explain(), model.explain()
    assert getattr(model.gate, "calls", 0) == getattr(eager.gate, "calls", 0)
    x = torch.randn(2, 5, 16)
    _assert_same_grads(_run(model, x, True), _run(eager, x, True))


class Fp32SharedMoE(zoo.GeluSharedMoE):
    """The shared expert returns fp32 for an fp16 input: eager's sum is fp32."""

    def forward(self, hidden_states):
        return zoo.MixtralMoE.forward(self, hidden_states) + self.shared_expert(hidden_states).float()


def test_y_has_the_dtype_the_forward_returns():
    model, eager = _pair(lambda: Fp32SharedMoE().half())
    x = torch.randn(2, 5, 16).half()
    with torch.no_grad():
        y, want = model(x), eager(x)
    assert y.dtype == want.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=2e-3, atol=2e-3)
