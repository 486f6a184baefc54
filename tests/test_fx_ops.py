"""The frontend's fx vocabulary (`moec.frontend.fx_ops`): one name per op whatever the spelling, the
same name in both tracing modes (so the MoE lifter and the MoBA matcher read one language), and the
walks through layout ops."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from moec.frontend.fx_ops import (MATMULS, MAXES, RESHAPES, chain, is_inplace, op_name, search, source, strip)
from moec.frontend.trace import Bound, trace, trace_partial

A = torch.randn(2, 3, 4)
B = torch.randn(2, 4, 5)

# name -> spellings of one op, each ``fn(a, b) -> tensor`` on a [2, 3, 4] and a [2, 4, 5] tensor
SPELLINGS = {
    "matmul": [torch.matmul, operator.matmul, torch.bmm, lambda a, b: a.matmul(b), lambda a, b: a.bmm(b),
               lambda a, b: a @ b],
    "einsum": [lambda a, b: torch.einsum("bij,bjk->bik", a, b)],
    "softmax": [lambda a, b: torch.softmax(a, -1), lambda a, b: F.softmax(a, -1), lambda a, b: a.softmax(-1),
                lambda a, b: torch.special.softmax(a, -1)],
    "sigmoid": [lambda a, b: torch.sigmoid(a), lambda a, b: a.sigmoid(), lambda a, b: F.sigmoid(a),
                lambda a, b: torch.special.expit(a)],
    "relu": [lambda a, b: torch.relu(a), lambda a, b: F.relu(a), lambda a, b: a.relu()],
    "tanh": [lambda a, b: torch.tanh(a), lambda a, b: a.tanh(), lambda a, b: F.tanh(a)],
    "gelu": [lambda a, b: F.gelu(a)],
    "gelu_tanh": [lambda a, b: F.gelu(a, approximate="tanh")],
    "topk": [lambda a, b: torch.topk(a, 2)[0], lambda a, b: a.topk(2)[0]],
    "max": [lambda a, b: torch.max(a, -1)[0], lambda a, b: a.max(-1)[0]],
    "amax": [lambda a, b: torch.amax(a, -1), lambda a, b: a.amax(-1)],
    "sum": [lambda a, b: torch.sum(a, -1), lambda a, b: a.sum(-1)],
    "mean": [lambda a, b: torch.mean(a, -1), lambda a, b: a.mean(-1)],
    "add": [lambda a, b: a + 1.0, lambda a, b: torch.add(a, 1.0), lambda a, b: a.add(1.0)],
    "sub": [lambda a, b: a - 1.0, lambda a, b: torch.sub(a, 1.0), lambda a, b: a.sub(1.0)],
    "mul": [lambda a, b: a * 2.0, lambda a, b: torch.mul(a, 2.0), lambda a, b: a.mul(2.0)],
    "div": [lambda a, b: a / 2.0, lambda a, b: torch.div(a, 2.0), lambda a, b: a.div(2.0),
            lambda a, b: torch.true_divide(a, 2.0)],
    "reshape": [lambda a, b: torch.reshape(a, (6, 4)), lambda a, b: a.reshape(6, 4)],
    "view": [lambda a, b: a.view(6, 4)],
    "transpose": [lambda a, b: torch.transpose(a, 1, 2), lambda a, b: a.transpose(1, 2),
                  lambda a, b: a.swapaxes(1, 2)],
    "chunk": [lambda a, b: torch.chunk(a, 2, -1)[0], lambda a, b: a.chunk(2, -1)[0]],
    "split": [lambda a, b: torch.split(a, 2, -1)[0], lambda a, b: a.split(2, -1)[0]],
    "cat": [lambda a, b: torch.cat([a, a], -1), lambda a, b: torch.concat([a, a], -1)],
    "masked_fill": [lambda a, b: a.masked_fill(a > 0, 0.0), lambda a, b: torch.masked_fill(a, a > 0, 0.0)],
    "where": [lambda a, b: torch.where(a > 0, a, 0.0), lambda a, b: a.where(a > 0, 0.0)],
    "dropout": [lambda a, b: F.dropout(a, 0.1, False)],
}
MODULES = {"softmax": nn.Softmax(-1), "sigmoid": nn.Sigmoid(), "relu": nn.ReLU(), "tanh": nn.Tanh(),
           "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "softplus": nn.Softplus(),
           "dropout": nn.Dropout(0.1), "identity": nn.Identity(), "module": nn.LayerNorm(4)}


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


class _Mod(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, a, b):
        return self.m(a)


def _op_nodes(tr):
    return [n for n in tr.graph.nodes if n.op.startswith("call_")]


def _both(module):
    """The named op nodes of ``module`` as the MoE lifter (partial) and the MoBA matcher (meta) trace it."""
    partial = trace_partial(module)
    meta = trace(module, Bound(("a", "b"), (A, B)))
    assert partial.complete
    return ([partial.kind(n) for n in _op_nodes(partial)], [meta.kind(n) for n in _op_nodes(meta)])


@pytest.mark.parametrize("name, fn", [(k, f) for k, fs in SPELLINGS.items() for f in fs])
def test_every_spelling_has_one_name_in_both_modes(name, fn):
    partial, meta = _both(_Fn(fn))
    assert partial == meta, (partial, meta)
    assert name in partial, partial
    assert not {n for n in partial if n != name} & set(SPELLINGS), partial   # no other known op in there


@pytest.mark.parametrize("name", MODULES)
def test_modules_are_named_by_class_in_both_modes(name):
    partial, meta = _both(_Mod(MODULES[name]))
    assert partial == meta == [name]


def test_unknown_ops_keep_their_own_names():
    partial, meta = _both(_Fn(lambda a, b: torch.exp(a).cumsum(-1)))
    assert partial == meta == ["exp", "cumsum"]
    assert op_name(None) is None


def test_families():
    assert MATMULS == {"matmul", "einsum"} and RESHAPES == {"view", "reshape"} and MAXES == {"max", "amax"}


class _Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, a, b):
        scores = a @ (self.w.t().float() * 0.5)
        return scores.softmax(-1).topk(2)[1]


def test_walks():
    tr = trace(_Router(), Bound(("a", "b"), (A, B)))
    mm = next(n for n in tr.graph.nodes if tr.kind(n) == "matmul")
    w = mm.args[1]
    assert [tr.kind(n) for n in chain(w)] == ["mul", "float", "transpose", "get_attr"]
    assert source(w).op == "get_attr" and source(w).target == "w"
    assert strip(w.args[0]) is w.args[0].args[0]               # a cast peeled off, nothing more
    topk = next(n for n in tr.graph.nodes if tr.kind(n) == "topk")
    assert search(topk.args[0], {"softmax"}, MATMULS) is mm
    idx = next(iter(topk.users))
    assert chain(idx) == [idx]                                  # indexing topk's tuple is no layout op
    partial = trace_partial(_Router())                          # no values: the same walk to the weight
    pmm = next(n for n in partial.graph.nodes if partial.kind(n) == "matmul")
    assert source(pmm.args[1]).target == "w"


def test_in_place_writes():
    g = fx.Graph()
    x = g.placeholder("x")
    assert is_inplace(g.call_method("masked_fill_", (x, x, 0.0)))
    assert is_inplace(g.call_method("mul_", (x, 2.0)))
    assert is_inplace(g.call_function(operator.setitem, (x, 0, 1.0)))
    assert not is_inplace(g.call_method("mul", (x, 2.0)))
    assert not is_inplace(g.call_method("__matmul__", (x, x)))
    assert op_name(g.call_method("mul_", (x, 2.0))) == "mul"
