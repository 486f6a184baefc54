"""The frontend's tracer (`moec.frontend.trace`), both modes: leaves, stopping at data-dependent
operations, and never changing the user's module (its attributes, buffers, class, training flags)
or torch itself."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moec.frontend.trace import Bound, TraceFailed, bind, signature, trace, trace_partial


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.register_buffer("scale", torch.full((8,), 2.0))

    def forward(self, x):
        return self.up(x) * self.scale.unsqueeze(0)         # a buffer used inside a traced submodule


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.expert = Expert()
        self.drop = nn.Dropout(0.5)
        self.calls = 0

    def forward(self, x):
        logits = self.drop(self.router(x))
        h = self.expert(x)
        if logits.sum() > 0:                                # data-dependent: a symbolic trace stops here
            h = h * 2
        return h


def snapshot(m: nn.Module):
    return (type(m), {k: v for k, v in vars(m).items() if k != "_modules"}, copy.deepcopy(m.state_dict()),
            [(n, type(c), c.training) for n, c in m.named_modules()])


def assert_same(m, snap):
    cls, attrs, state, mods = snap
    assert type(m) is cls and [(n, type(c), c.training) for n, c in m.named_modules()] == mods
    assert {k: v for k, v in vars(m).items() if k != "_modules"}.keys() == attrs.keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def kinds(tr) -> list:
    return [tr.kind(n) for n in tr.graph.nodes]


@pytest.mark.parametrize("training", [None, True, False])
def test_partial_trace_keeps_the_prefix_and_never_mutates(training):
    m = Layer().eval()
    snap = snapshot(m)
    tr = trace_partial(m, training=training)
    assert not tr.complete and "TraceError" in tr.stopped and "stopped after" in tr.describe_stop()
    assert kinds(tr)[:3] == ["placeholder", "linear", "dropout"] and "sum" in kinds(tr)
    assert_same(m, snap)
    assert tr.root is not m and type(tr.root) is Layer


def test_partial_trace_leaves_and_buffer_names():
    m = Layer()
    leafy = trace_partial(m, leaves=[m.expert])
    assert [n.target for n in leafy.graph.nodes if n.op == "call_module"] == ["router", "drop", "expert"]
    inside = trace_partial(m)                               # the expert traced through: its buffer by path
    assert "expert.scale" in {n.target for n in inside.graph.nodes if n.op == "get_attr"}
    assert not any(k.startswith("_tensor_constant") for k in vars(m))


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3)

    def forward(self, x):
        logits = self.router(x)
        if self.router.training:                            # noise in training only
            logits = logits + torch.randn_like(logits)
        return logits


def test_partial_trace_sets_and_restores_training_flags():
    m = Noisy().eval()
    assert "randn" in kinds(trace_partial(m, training=True))
    assert not any(c.training for c in m.modules())
    assert "randn" not in kinds(trace_partial(m))
    m.train()
    assert "randn" not in kinds(trace_partial(m, training=False))
    assert all(c.training for c in m.modules())


class Core(nn.Module):
    def __init__(self, bs=4):
        super().__init__()
        self.bs = bs
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        B, N, D = x.shape
        blocks = [x[:, i:i + self.bs].mean(1) for i in range(0, N, self.bs)]      # unrolled per length
        pos = torch.arange(N, device=x.device)
        return self.proj(torch.stack(blocks, 1)) * scale, pos


def test_meta_trace_specialises_and_never_mutates():
    m = Core()
    snap = snapshot(m)
    x = torch.randn(2, 10, 8)
    arange = torch.arange
    tr = trace(m, bind(m, (x,), {}))
    assert torch.arange is arange                                         # torch's factories restored
    assert tr.complete and tr.device == torch.device("cpu")
    vals = [n.meta["val"] for n in tr.graph.nodes if n.op != "output"]
    assert all(v.device.type == "meta" for v in vals if isinstance(v, torch.Tensor))
    assert sum(tr.kind(n) == "mean" for n in tr.graph.nodes) == 3        # 10 tokens, blocks of 4
    assert [tr.kind(n) for n in tr.graph.nodes if n.op == "call_module"] == ["linear"]
    assert any(tr.kind(n) == "arange" for n in tr.graph.nodes)            # a factory is a node
    assert_same(m, snap)


class DataDependent(nn.Module):
    def forward(self, x):
        return x[: int(x.sum().item())]


class Counts(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = nn.Identity()

    def forward(self, x):
        self.child.seen = 1
        return x


SETATTR = nn.Module.__setattr__


@pytest.mark.parametrize("module, words", [(DataDependent(), "item"), (Counts(), "module state changes")])
def test_meta_trace_stops_with_the_reason(module, words):
    snap = snapshot(module)
    with pytest.raises(TraceFailed, match=words):
        trace(module, bind(module, (torch.randn(3, 2),), {}))
    assert_same(module, snap)
    assert nn.Module.__setattr__ is SETATTR
    assert not any(hasattr(c, "seen") for c in module.modules())


def test_both_modes_trace_the_users_own_forward():
    """A module moec compiled has a subclass whose forward runs the region: the user's forward is traced."""
    class Compiled(Core):
        _moec_base = Core

        def forward(self, *args, **kwargs):
            raise AssertionError("the compiled forward must not be traced")

    m = Core()
    m.__class__ = Compiled
    x = torch.randn(1, 8, 8)
    assert trace_partial(m).graph.nodes
    assert trace(m, bind(m, (x,), {})).complete
    assert type(m) is Compiled


def test_signature_keys_shapes_values_and_attributes():
    m = Core()
    x = torch.randn(2, 10, 8)
    key = signature(m, bind(m, (x,), {}))
    assert key == signature(m, bind(m, (torch.zeros(2, 10, 8),), {"scale": 1.0}))
    assert key != signature(m, bind(m, (torch.randn(2, 11, 8),), {}))
    m.bs = 5
    assert key != signature(m, bind(m, (x,), {}))
    assert signature(m, Bound(("x", "scale"), (x, object()))) is None
