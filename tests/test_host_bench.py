"""``benchmarks/host.py`` on the CPU: it measures moec's host path with launches skipped, counts
launches and ATen ops, and leaves the kernels working afterwards; a loaded kernel is resolved once."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

import moec
import zoo
from moec.runtime import cache

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _host():
    spec = importlib.util.spec_from_file_location("moec_bench_host", BENCHMARKS / "host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_host_benchmark_runs_small_and_restores_launches(monkeypatch):
    host = _host()
    monkeypatch.setattr(host, "_layers", lambda: {"zoo Mixtral": lambda: zoo.MixtralMoE()})
    rows = host.measure(reps=1)
    assert [r["T"] for r in rows] == [1, 16]
    assert all(r["launches"] >= 3 and r["aten_ops"] > 0 and r["moec_us"] > 0 and r["eager_us"] > 0 for r in rows)
    torch.manual_seed(0)
    eager = zoo.MixtralMoE().eval()
    model = moec.compile(copy.deepcopy(eager))
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)


def test_a_kernel_is_resolved_once_not_per_launch(monkeypatch):
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().eval())
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        model(x)
        calls = []
        original = cache.load
        monkeypatch.setattr(cache, "load", lambda *a: calls.append(a) or original(*a))
        model(x)
    assert calls == []


def test_a_decode_call_runs_no_aten_sort_and_few_ops():
    """At decode the routing kernel groups the pairs by expert itself (fuse-dispatch) and the layer's
    launches are planned once: a T = 1 call of a compiled layer (kernels skipped) runs no ATen sort,
    histogram, cumsum or searchsorted, only its buffers' allocations and a few views."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    host = _host()
    torch.manual_seed(0)
    for make in (zoo.MixtralMoE, zoo.DeepseekV3MoE):
        model = moec.compile(make().eval())
        x = torch.randn(1, 1, 16)
        with torch.no_grad():
            model(x)
            with host.kernels_skipped() as launches:
                ops = Ops()
                with ops:
                    model(x)
        bad = [n for n in ops.names if any(w in n for w in ("sort", "histc", "bincount", "cumsum", "searchsorted"))]
        assert ops.names and not bad, bad
        assert all(n.split(".")[1] in ("empty", "view", "_unsafe_view", "reshape") for n in ops.names), ops.names
        assert launches[0] == (6 if make is zoo.DeepseekV3MoE else 4)
