"""``mode="reduce-overhead"``: inference calls of a compiled MoE layer replay a graph captured per token
count. On a CPU the bookkeeping is tested with a stand-in capture that has CUDA graphs' contract (a replay
reads the static inputs, writes the static outputs, reads the weights where they live); with a GPU, real
CUDA graphs are compared with eager."""
from __future__ import annotations

import copy

import pytest
import torch

import moec
import zoo
from moec import moe_region
from moec.runtime import graphs


def _stand_in(fn):
    """Capture: run once, keep the outputs as the static buffers; replay: run again, write them there."""
    outputs = fn()

    def replay():
        for o, new in zip(outputs, fn()):
            o.copy_(new)
    return replay, outputs


@pytest.fixture
def stand_in_graphs(monkeypatch):
    monkeypatch.setattr(moe_region, "not_capturable", lambda x: "")
    monkeypatch.setattr(graphs.GraphCache.__init__, "__defaults__", (_stand_in,))


def _region(model):
    return model.__dict__["_moec_region"]


def _eager(model, x):
    with torch.no_grad(), moec.disabled():
        return model(x)


def test_graph_cache_copies_inputs_in_and_clones_outputs_out():
    cache = graphs.GraphCache(_stand_in)
    seen = []

    def run(inputs):
        seen.append(inputs["x"].data_ptr())
        return [inputs["x"] * 2]
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    (ya,) = cache.run(run, {"x": a}, graphs.graph_key({"x": a}))
    (yb,) = cache.run(run, {"x": b}, graphs.graph_key({"x": b}))
    assert torch.equal(ya, a * 2) and torch.equal(yb, b * 2)     # the first result survived the replay
    assert len(set(seen)) == 1 and seen[0] not in (a.data_ptr(), b.data_ptr())   # static inputs, copied in
    assert (cache.captures, cache.replays) == (1, 2)
    for T in range(2, 2 + graphs.GraphCache.MAX_GRAPHS + 1):
        x = torch.randn(T, 4)
        cache.run(run, {"x": x}, graphs.graph_key({"x": x}))
    assert len(cache._graphs) == graphs.GraphCache.MAX_GRAPHS


def test_reduce_overhead_replays_per_token_count(stand_in_graphs):
    torch.manual_seed(0)
    model = moec.compile(zoo.DeepseekV3MoE().eval(), mode="reduce-overhead")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for T in (1, 1, 4, 1, 4):
            x = torch.randn(1, T, 16)
            torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-5)
        y1 = model(x)
        y1.zero_()                                   # a caller's result is its own
        torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-5)
    caches = [g for (_, _, _, g) in _region(model)._kept.programs.values()]
    assert sum(g.captures for g in caches) == 2 and sum(g.replays for g in caches) == 7
    assert "CUDA graphs (mode='reduce-overhead'): 2 captured, 7 replays" in model.explain()


def test_reduce_overhead_sees_weight_writes_and_recaptures_replaced_weights(stand_in_graphs):
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().eval(), mode="reduce-overhead")
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        model(x)
        for net in (model, twin):                   # a write into the weights' memory: the same graph
            net.experts[0].w2.weight.mul_(3.0)
        torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-5)
        new = torch.randn(32, 16)
        for net in (model, twin):                   # a replaced weight: a new binding, a new graph
            net.experts[1].w1.weight = torch.nn.Parameter(new.clone())
        torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-5)
    caches = [g for (_, _, _, g) in _region(model)._kept.programs.values()]
    assert sum(g.captures for g in caches) == 1       # the old binding's graphs went with it


def test_reduce_overhead_takes_no_graph_for_training_or_gradients(stand_in_graphs):
    torch.manual_seed(0)
    model = moec.compile(zoo.NoisyTopKMoE().train(), mode="reduce-overhead")
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        model(x)                                    # training noise: drawn per call, no graph
    model(x).sum().backward()                       # gradients: the training forward, no graph
    assert _region(model)._kept is None or all(
        g.captures == 0 for (_, _, _, g) in _region(model)._kept.programs.values())


def test_a_failed_capture_falls_back_and_says_why(monkeypatch):
    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(moe_region, "not_capturable", lambda x: "")
    monkeypatch.setattr(graphs.GraphCache.__init__, "__defaults__", (broken,))
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().eval(), mode="reduce-overhead")
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-5)
    assert "capture failed: RuntimeError: operation not permitted" in model.explain()


def test_mode_is_checked_and_survives_pickling():
    with pytest.raises(ValueError, match="mode='max-autotune'"):
        moec.compile(zoo.MixtralMoE(), mode="max-autotune")
    model = moec.compile(zoo.MixtralMoE().eval(), mode="reduce-overhead")
    again = copy.deepcopy(model)
    assert _region(again).mode == "reduce-overhead"
    with torch.no_grad():
        again(torch.randn(1, 2, 16))
    assert "no graph, 1 x: not on a GPU" in again.explain()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("make", [zoo.MixtralMoE, zoo.DeepseekV3MoE], ids=["mixtral", "deepseek"])
def test_cuda_graph_replay_equals_eager(make):
    torch.manual_seed(0)
    model = moec.compile(make().cuda().eval(), mode="reduce-overhead")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for T in (1, 1, 7, 1):
            x = torch.randn(1, T, 16, device="cuda")
            torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-4)
    caches = [g for (_, _, _, g) in _region(model)._kept.programs.values()]
    assert sum(g.captures for g in caches) == 2 and sum(g.replays for g in caches) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_call_inside_the_callers_capture_is_captured_by_it():
    """A model compiled with mode="reduce-overhead" called inside the caller's own CUDA graph capture starts no
    capture of its own: its kernels land in the caller's graph, whose replay equals eager."""
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().cuda().eval(), mode="reduce-overhead")
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 16, device="cuda")
    with torch.no_grad():
        model(x)                                        # kernels compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = model(x)
        x.copy_(torch.randn(1, 3, 16, device="cuda"))
        graph.replay()
        torch.testing.assert_close(y, _eager(twin, x), rtol=1e-4, atol=1e-4)
    assert any("the caller is capturing" in why for why in _region(model).graph_skips)


def test_prefill_and_a_dumps_first_call_take_no_graph(stand_in_graphs, tmp_path):
    """Past `GraphCache.MAX_TOKENS` tokens a call runs its kernels directly (prefill: launches cost little next
    to its kernels; a graph per prompt length would keep large buffers alive); with a dump, the first call of
    a program writes its launches, then calls take graphs."""
    torch.manual_seed(0)
    model = moec.compile(zoo.MixtralMoE().eval(), mode="reduce-overhead", dump_dir=tmp_path)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for T in (2, 2, graphs.GraphCache.MAX_TOKENS + 1):
            x = torch.randn(1, T, 16)
            torch.testing.assert_close(model(x), _eager(twin, x), rtol=1e-4, atol=1e-5)
    skips = _region(model).graph_skips
    assert skips["its first call writes the dump's launches"] == 1, skips
    assert any(why.startswith(f"more than {graphs.GraphCache.MAX_TOKENS} tokens") for why in skips), skips
    assert list(tmp_path.rglob("launches.json"))
    caches = [g for (_, _, _, g) in _region(model)._kept.programs.values()]
    assert sum(g.captures for g in caches) == 1 and sum(g.replays for g in caches) == 1
