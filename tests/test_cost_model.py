"""The cost model, the per-bucket tiles choose-tiles attaches, and their kernels.

- arch facts are complete for every GPU target; a GPU gets its capability's target with the
  limits it reports, an unknown capability a clear error;
- a grouped GEMM's FLOPs, bytes, hit experts, row tiles, programs and waves are sympy expressions
  of T (and of the per-expert loads, when given) that agree with the numeric evaluation the model
  ranks tiles with; its traffic per program order;
- the tiles chosen for real models (Mixtral 8x7B, Qwen3-30B-A3B, DeepSeek-V3, OLMoE) on every
  arch: decode (T <= 16) gets BLOCK_M 16 with a narrow N and a deep K, large T 64+-row tiles on
  the fast tensor-core family, every tile fits the model's shared-memory and register limits;
- compiled ahead of time for every arch at the models' real sizes (recorded without running: meta
  tensors), the chosen tiles fit the arch's shared memory, and the model's shared-memory estimate
  is never below what Triton allocates (so a tile the model admits fits). By default every bucket
  of Mixtral's up-projection (the most shared memory per tile: two weight tiles) and every kernel
  kind of DeepSeek-V3 at its largest bucket are compiled for sm80, sm89, sm90 and sm100 (sm86 and
  sm120 share sm89's limits); ``MOEC_AOT_ALL=1`` compiles every kernel of every model at every
  bucket for every arch;
- a compiled program launches the kernel of the current T's bucket (T = 4 and T = 300), each
  rendered once, named by its bucket, its header showing its tile and the node's tiles.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import sympy
import torch

from moec import reference as ref
from moec.compiler import compile_spec
from moec.ir import parse_graph, print_graph
from moec.ir.types import T
from moec.passes import cost_model as cm
from moec.passes.cost_terms import MAX_SYNC_REGS, sync_mma, sync_regs
from moec.ir.build import moe_inputs
from moec.runtime import arch as arch_module
from aot_util import LARGE, aot_archs
from moec.runtime.aot import compile_launch
from moec.runtime.arch import ARCHS, GPU_ARCHS, arch_of, with_device_facts
from moec.runtime.launch import Kernel, recording
from moec.ir.tiles import (BUCKETS, GemmTile, RowTile, bucket_of, bucket_ranges, bucket_suffix, bucket_text,
                                merge_buckets)
from moec.spec import MoESpec, MoEWeights, RouterConfig, SharedExpertConfig

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

MODELS = {
    "mixtral-8x7b": MoESpec(4096, 14336, RouterConfig(8, 2, renormalize=True)),
    "qwen3-30b-a3b": MoESpec(2048, 768, RouterConfig(128, 8, renormalize=True)),
    "deepseek-v3": MoESpec(7168, 2048, RouterConfig(256, 8, score="sigmoid", score_bias=True, n_group=8,
                                                    topk_group=4, group_score="top2_sum", renormalize=True,
                                                    routed_scaling=2.5), shared=SharedExpertConfig(2048)),
    "olmoe": MoESpec(2048, 1024, RouterConfig(64, 8)),
}


def compiled(model: str, arch: str):
    return compile_spec(MODELS[model], torch.bfloat16, ("y",), ARCHS[arch])


def kernel_steps(c):
    return [s for s in c.program.steps if s.variants]


# ---- facts ------------------------------------------------------------------------------------

def test_arch_facts_are_complete():
    for name in GPU_ARCHS:
        a = ARCHS[name]
        assert a.name == name and a.cc == int(name[2:])
        assert a.sms > 0 and a.regs_per_sm == 65536 and a.max_regs_per_thread == 255
        assert 0 < a.smem_per_block <= a.smem_per_sm
        assert a.bf16_tflops > a.fp32_tflops > 0 and a.dram_gbps > 0 and a.l2_bytes >= 4 << 20 and a.part
    assert [ARCHS[n].mma for n in GPU_ARCHS] == ["mma.sync", "mma.sync", "mma.sync", "wgmma", "tcgen05", "mma.sync"]
    assert [ARCHS[n].fp8 for n in GPU_ARCHS] == [False, False, True, True, True, True]
    assert ARCHS["sm90"].fast_mma_min_m == ARCHS["sm100"].fast_mma_min_m == 64


class FakeProps:
    """What ``torch.cuda.get_device_properties`` reports (an H100 PCIe unless told otherwise)."""
    def __init__(self, **kw):
        self.name, self.multi_processor_count, self.L2_cache_size = "NVIDIA H100 PCIe", 114, 50 << 20
        self.shared_memory_per_block_optin, self.shared_memory_per_multiprocessor = 227 * 1024, 228 * 1024
        self.__dict__.update(kw)


@pytest.mark.parametrize("cc, target", [((8, 0), "sm80"), ((8, 6), "sm86"), ((8, 7), "sm86"), ((8, 9), "sm89"),
                                        ((9, 0), "sm90"), ((10, 0), "sm100"), ((10, 3), "sm100"), ((11, 0), "sm100"),
                                        ((12, 0), "sm120"), ((12, 1), "sm120"), ((7, 5), None), ((13, 0), None)])
def test_device_detection(monkeypatch, cc, target):
    """A GPU gets the target of its capability with the limits it reports (SMs, shared memory, L2);
    a capability without a target is a clear error, never another generation's facts."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: FakeProps())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # the answer is cached per process: a fresh cache for the fakes, the real one back afterwards
    monkeypatch.setattr(arch_module, "_cuda_arch", functools.lru_cache(arch_module._cuda_arch.__wrapped__))
    if target is None:
        with pytest.raises(RuntimeError, match=rf"compute capability {cc[0]}\.{cc[1]}.*arch="):
            arch_of("cuda")
        return
    a = arch_of("cuda")
    assert arch_of("cuda:0") is a                        # one answer per device and process
    assert a.name == target and a.mma == ARCHS[target].mma and a.bf16_tflops == ARCHS[target].bf16_tflops
    assert (a.sms, a.l2_bytes, a.smem_per_block, a.part) == (114, 50 << 20, 227 * 1024, "NVIDIA H100 PCIe")
    # the cost model sizes waves by the device's SMs
    up = _problems("mixtral-8x7b")["h"]
    tile = GemmTile(128, 128, 64, 8, 4)
    assert up.slots(tile, a) == 114 * up.slots(tile, ARCHS[target]) // ARCHS[target].sms


def test_device_facts_keep_nominal_values_the_device_does_not_report():
    a = with_device_facts(ARCHS["sm90"], FakeProps(multi_processor_count=0, L2_cache_size=None))
    assert (a.sms, a.l2_bytes, a.smem_per_block) == (ARCHS["sm90"].sms, ARCHS["sm90"].l2_bytes, 227 * 1024)


# ---- expressions ------------------------------------------------------------------------------

def _problems(model: str):
    c = compiled(model, "sm90")
    return {s.node.name: cm.problem_of(s.node, c.graph) for s in kernel_steps(c)}


def test_gemm_expressions_of_T():
    up = _problems("mixtral-8x7b")["h"]                       # gate+up with the gather prologue
    assert (up.experts, up.rows_per_token, up.a_rows_per_token, up.n, up.k, up.glu) == (8, 2, 1, 14336, 4096, True)
    e = cm.describe(up, GemmTile(16, 64, 128, 4, 4), ARCHS["sm90"])
    assert e["flops"] == 2 * (2 * T) * 14336 * 4096 * 2
    assert e["hit_experts"] == sympy.Min(8, 2 * T)
    assert sympy.simplify(e["bytes"] - (T * 4096 * 2 + sympy.Min(8, 2 * T) * 2 * 14336 * 4096 * 2
                                        + 2 * T * 14336 * 2 + 4 * 2 * T)) == 0
    assert e["row_tiles"].subs(T, 1) == 2                     # two pairs, two experts, a tile each
    assert e["row_tiles"].subs(T, 4096) == 8 * 64             # 1024 rows per expert / 16
    assert e["programs"].subs(T, 1) == 2 * 14336 // 64
    assert e["waves"].free_symbols == {T}
    # the expressions are what the model evaluates
    tile = GemmTile(64, 128, 64, 4, 3)
    for t in (0, 1, 3, 16, 100, 1000, 5000):
        for name, fn in (("row_tiles", up.row_tiles), ("programs", up.programs)):
            assert cm.describe(up, tile, ARCHS["sm90"])[name].subs(T, t) == fn(tile, t, cm.Num), (name, t)
        assert cm.describe(up, tile, ARCHS["sm90"])["waves"].subs(T, t) == up.waves(tile, ARCHS["sm90"], t, cm.Num)
        assert sympy.sympify(up.bytes()).subs(T, t) == up.bytes(t, cm.Num)


def test_dense_and_row_expressions():
    p = _problems("deepseek-v3")
    shared = p["shared_h"]                                     # the shared expert: every token, one weight
    assert (shared.experts, shared.routed, shared.rows_per_token) == (1, False, 1)
    assert sympy.sympify(shared.hit_experts()) == sympy.Min(1, T)
    red = p["y"]
    # k bf16 pair rows (the pair buffer is in the layer's dtype), the bf16 output, the fp32 shared-expert residual
    assert sympy.sympify(red.bytes()) == T * 7168 * (8 * 2 + 2 + 4) + 4 * 8 * T
    route = p["ids"]
    assert route.e_pad == 256 and sympy.sympify(route.flops()) == 2 * T * 7168 * 256


def test_model_prefers_memory_parallelism_at_decode_and_big_tiles_at_scale():
    # Qwen3's narrow experts (N = 768) on an H100: at T = 1 a 128-wide tile leaves SMs idle
    up, arch = _problems("qwen3-30b-a3b")["h"], ARCHS["sm90"]
    small, big = GemmTile(16, 64, 128, 4, 4), GemmTile(128, 128, 64, 8, 4)
    assert up.time(small, arch, 1) < up.time(big, arch, 1)
    assert up.time(big, arch, 16384) < 0.5 * up.time(small, arch, 16384)
    # on every arch, the decode choice is bound by the hit experts' weights: within 2x of bytes / bandwidth
    for arch in map(ARCHS.get, GPU_ARCHS):
        tile = cm.choose(up, arch, 1, 16)
        floor = up.bytes(1, cm.Num) / (arch.dram_gbps * 1e9)
        assert floor < up.time(tile, arch, 1) < 2 * floor, arch.name


def test_expressions_of_per_expert_loads():
    """With per-expert loads the GEMM's quantities are exact in them: the symbolic expressions agree
    with the numbers, even loads reproduce the uniform-routing ones, and skew shows what it saves
    (all pairs to one expert: one expert's weights, full tiles)."""
    up, arch = _problems("mixtral-8x7b")["h"], ARCHS["sm90"]
    tile, n = GemmTile(128, 128, 64, 8, 4, 16), up.load_symbols()
    exprs = cm.describe(up, tile, arch, loads=n)
    assert str(exprs["row_tiles"]).startswith("ceiling(n_0/128) + ceiling(n_1/128)")
    for loads in ([0, 3, 129, 0, 1, 64, 256, 7], [5] * 8, [40, 0, 0, 0, 0, 0, 0, 0]):
        t = sum(loads) // 2 + 1                         # any T: loads need not be k T (dropped pairs)
        values = {**dict(zip(n, loads)), T: t}
        numbers = {"flops": up.flops(t, loads), "bytes": up.bytes(t, cm.Num, loads),
                   "programs": up.programs(tile, t, cm.Num, loads), "waves": up.waves(tile, arch, t, cm.Num, loads),
                   "hit_experts": up.hit_experts(t, cm.Num, loads), "row_tiles": up.row_tiles(tile, t, cm.Num, loads)}
        for name, expr in exprs.items():
            assert expr.subs(values) == numbers[name], (name, loads)
    for t in (4, 4096, 16384):                          # even loads: the uniform assumption's numbers
        even = [2 * t // 8] * 8
        assert up.bytes(t, cm.Num, even) == up.bytes(t, cm.Num) and up.row_tiles(tile, t, cm.Num, even) == up.row_tiles(tile, t, cm.Num)
        assert up.traffic(tile, arch, t, even) == up.traffic(tile, arch, t)
        # (the uniform assumption's time counts the spread of the loads: some experts' last tiles padded)
        assert up.time(tile, arch, t, even) <= up.time(tile, arch, t)
    t, w_bytes = 4096, 2 * 14336 * 4096 * 2
    one = [2 * t] + [0] * 7
    assert up.hit_experts(t, cm.Num, one) == 1 and up.row_tiles(tile, t, cm.Num, one) == 64
    assert up.bytes(t, cm.Num) - up.bytes(t, cm.Num, one) == 7 * w_bytes
    decode = cm.choose(up, arch, 1, 16)
    assert up.time(decode, arch, 16, [32] + [0] * 7) < 0.5 * up.time(decode, arch, 16)
    with pytest.raises(ValueError, match="no per-expert loads"):
        cm.describe(_problems("mixtral-8x7b")["y"], RowTile(16, 128), arch, loads=n)


@pytest.mark.parametrize("rows,experts,block_m", [(8, 256, 16), (100, 8, 16), (513, 8, 16), (8192, 128, 128),
                                                 (32768, 256, 128), (32768, 8, 128), (4096 * 8, 128, 64)])
def test_expected_tiles_counts_the_spread_of_loads(rows, experts, block_m):
    """`cost_terms.expected_tiles` (Poisson loads, a normal law for large means) is what uniform routing gives:
    within 3% of a sampled estimate, and at least the mean load's tiles when every expert is hit (DeepSeek-V3 at
    T = 4096: 1.5 tiles of 128 an expert, not 1)."""
    from moec.passes.cost_terms import expected_tiles
    g = torch.Generator().manual_seed(rows)
    draws = [torch.bincount(torch.randint(0, experts, (rows,), generator=g), minlength=experts) for _ in range(200)]
    sampled = sum(int(((n + block_m - 1) // block_m).sum()) for n in draws) / len(draws)
    got = expected_tiles(rows, experts, block_m)
    assert got == pytest.approx(sampled, rel=0.03)
    if rows >= 4 * experts:
        assert got >= experts * -(-rows // (experts * block_m)) - 1e-9 or rows % (experts * block_m)
    if (rows, experts, block_m) == (32768, 256, 128):
        assert 1.4 < got / experts < 1.6


def test_traffic_of_each_program_order():
    """Mixtral's gate+up at T = 16384 on an H100 (256 row tiles of 128, 32 per expert; 112 N tiles;
    132 resident programs; 25 MiB of L2 per operand): rows fastest over the grid re-read the 128 MiB
    of activations once per N tile, one row tile at a time re-reads each expert's 224 MiB of weights
    once per row tile, a group of 16 row tiles (16 MiB of rows) reads activations once and weights twice."""
    up, arch, t = _problems("mixtral-8x7b")["h"], ARCHS["sm90"], 16384
    x_bytes, w_bytes = t * 4096 * 2, 2 * 14336 * 4096 * 2
    floor = up.bytes(t, cm.Num)

    def traffic(group_m):
        tile = GemmTile(128, 128, 64, 8, 4, group_m)
        assert (up.row_tiles(tile, t, cm.Num), up.slots(tile, arch)) == (256, 132)
        return up.traffic(tile, arch, t)
    assert traffic(256) == traffic(10**6) == floor + 111 * x_bytes
    assert traffic(1) == floor + 31 * 8 * w_bytes
    assert traffic(16) == floor + 1 * 8 * w_bytes
    assert traffic(32) == floor + (112 * 32 / 132 - 1) * x_bytes
    # the least traffic of these orders is what the model picks for that tile (a near-tie in time)
    orders = [GemmTile(128, 128, 64, 8, 4, g) for g in cm.GEMM_GROUPS]
    assert min(orders, key=lambda tile: up.traffic(tile, arch, t)).group_m == 16


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_program_order_matters_only_at_scale(arch):
    """At decode every expert has one row tile: traffic is the floor for any order; at large T the
    chosen tile's order moves no more bytes (over the bucket's sample T) than any other order of the
    same blocks."""
    a = ARCHS[arch]
    for model in MODELS:
        for name, p in _problems(model).items():
            if not isinstance(p, cm.GemmProblem):
                continue
            for tile in cm.candidates(p, a)[::37]:
                assert p.traffic(tile, a, 1) == p.bytes(1, cm.Num) and p.traffic(tile, a, 16) == p.bytes(16, cm.Num)
            lo, hi = bucket_ranges(BUCKETS)[-1]
            best = cm.choose(p, a, lo, hi)
            def moved(tile):
                return sum(p.traffic(tile, a, t) for t in cm.bucket_samples(lo, hi))
            for g in cm.GEMM_GROUPS:
                assert moved(best) <= moved(dataclasses.replace(best, group_m=g)), (model, name, best, g)


# ---- choices ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_chosen_tiles_per_bucket(arch):
    a = ARCHS[arch]
    for model in MODELS:
        c = compiled(model, arch)
        for step in kernel_steps(c):
            tiles = step.node.attr["tiles"]
            assert list(tiles)[-1] is None and list(tiles) == sorted(tiles, key=lambda b: (b is None, b or 0))
            problem = cm.problem_of(step.node, c.graph)
            for tile in tiles.values():
                assert problem.fits(tile, a), (model, step.node.name, tile)
                if isinstance(tile, GemmTile):
                    assert problem.smem(tile, a) + cm.SMEM_RESERVE <= a.smem_per_block
            if step.node.op != "grouped_gemm":
                continue
            decode, large = step.variant(1).params.tile, step.variant(16384).params.tile
            where = f"{model} %{step.node.name} on {arch}: decode {decode}, large {large}"
            assert decode.block_m == 16 and decode.block_k >= 64, where
            assert large.block_m >= a.fast_mma_min_m and large.block_m >= 64, where
            assert large.block_n >= 64, where
            # Mixtral's decode down projection streams its weights from every SM (a grid on half of them cannot
            # pull the bandwidth), and on Hopper / Blackwell no bucket up to T = 1024 starts tens of thousands
            # of programs (each start costs: a 16 x 16 tile of DeepSeek-V3's would start ~65 k at T = 1024)
            if model.startswith("mixtral") and step.node.name == "pairs_out":
                assert problem.programs(decode, 1, cm.Num) >= a.sms, where
            for t in (16, 128, 1024) if arch in ("sm90", "sm100") else ():
                tile = step.variant(t).params.tile
                assert problem.programs(tile, t, cm.Num) <= 16_384, (where, t, tile)


def test_merge_and_bucket_helpers():
    a, b = GemmTile(16, 64, 128), GemmTile(128, 128, 64, 8, 4)
    assert merge_buckets({16: a, 128: a, 1024: b, None: b}) == {128: a, None: b}
    assert merge_buckets({None: b, 16: a}) == {16: a, None: b}
    assert [bucket_of(t, BUCKETS) for t in (0, 1, 16, 17, 128, 1024, 1025, 10**6)] == [16, 16, 16, 128, 128, 1024,
                                                                                      None, None]
    assert bucket_ranges([16, None]) == [(1, 16), (17, None)]
    assert bucket_suffix(1, 16) == "T1to16" and bucket_suffix(1025, None) == "T1025up"


def test_rows_per_program_never_carried_down_to_smaller_buckets():
    """A bucket takes the next larger bucket's tile only with the same BLOCK_M."""
    for arch in GPU_ARCHS:
        for model in MODELS:
            for step in kernel_steps(compiled(model, arch)):
                if step.node.op == "grouped_gemm":
                    assert step.variants[0].params.tile.block_m == 16, (arch, model, step.node.name)


def test_cpu_has_one_bucket():
    c = compile_spec(MoESpec(64, 128, RouterConfig(8, 2)), torch.float32, ("y",), ARCHS["cpu"])
    for step in kernel_steps(c):
        assert list(step.node.attr["tiles"]) == [None] and len(step.variants) == 1
        assert "_T" not in step.kernel.fn_name


def test_tiles_dict_round_trips_through_ir_text():
    c = compiled("mixtral-8x7b", "sm90")
    text = print_graph(c.graph)
    assert "tiles={" in text and "None: GemmTile(" in text
    assert print_graph(parse_graph(text)) == text
    g = parse_graph(text)
    assert [n.attr.get("tiles") for n in g.nodes] == [n.attr.get("tiles") for n in c.graph.nodes]


# ---- ahead-of-time compiles at real sizes ------------------------------------------------------

class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def record_variants(c, nodes=None, T=4) -> list:
    """Every variant of every kernel step (or of ``nodes``), launched on meta tensors of the IR's
    types at ``T`` with the launch itself skipped: the recorded signature, constexprs and
    specializations are a real launch's, no memory is touched."""
    types = dict(c.graph.inputs)
    for n in c.graph.nodes:
        types.update(n.result_types)

    def meta(name):
        t = types[name]
        return torch.empty(t.concrete(T=T), dtype=t.torch_dtype, device="meta")
    out = []
    for step in kernel_steps(c):
        if nodes is not None and step.node.name not in nodes:
            continue
        ins = {role: meta(v) for role, v in step.node.operands}
        outs = {role: meta(v) for role, v in step.node.results}
        ctx = {"T": T, "training": False, "noise": None}
        original = Kernel.function
        Kernel.function = lambda self, interpret: _NoLaunch()
        try:
            with recording() as recs:
                for v in step.variants:
                    step.launch(v.params, ins, outs, ctx)
        finally:
            Kernel.function = original
        own = [r for r in recs if any(r.kernel is v.kernel for v in step.variants)]   # (not the schedule's)
        assert len(own) == len(step.variants)
        out += [(step, v, r) for v, r in zip(step.variants, own)]
    return out


AOT_ALL = os.environ.get("MOEC_AOT_ALL") == "1"
# (model, kernel nodes or None for all, buckets or None for all): by default every bucket of
# Mixtral's up projection (the most shared memory: two weight tiles) and every kernel of DeepSeek-V3
# (routing with groups, shared expert, gather / scatter GEMMs, reduce) at its largest bucket
AOT_CASES = ([(m, None, None) for m in MODELS] if AOT_ALL
             else [("mixtral-8x7b", {"h"}, None), ("deepseek-v3", None, {None})])
# sm86 and sm120 have sm89's shared memory and mma.sync: compiling for them too repeats sm89's check. By default
# (a suite run) the forward's tiles on mma.sync's least shared memory (sm89), wgmma (sm90) and tcgen05 (sm100), the
# backward's on sm90; every arch with MOEC_AOT_ALL=1, the four under HYPOTHESIS_PROFILE=large
AOT_ARCHS = GPU_ARCHS if AOT_ALL else ("sm80", "sm89", "sm90", "sm100") if LARGE else ("sm89", "sm90", "sm100")
AOT_BACKWARD_ARCHS = AOT_ARCHS if AOT_ALL or LARGE else ("sm90",)


@pytest.mark.parametrize("arch", AOT_ARCHS)
def test_chosen_tiles_compile_and_fit(arch):
    a = ARCHS[arch]
    seen = set()
    for model, nodes, buckets in AOT_CASES:
        c = compiled(model, arch)
        for step, variant, rec in record_variants(c, nodes):
            if buckets is not None and variant.bound not in buckets:
                continue
            assert all(v in ("1", "D") for v in rec.specialization.values())
            key = (variant.params.tile, rec.kernel.fn_name.split("_T")[0], tuple(sorted(rec.constexprs.items())))
            if key in seen:
                continue
            seen.add(key)
            report = compile_launch(rec, arch)
            where = f"{model} %{step.node.name} {variant.params.tile} on {arch}"
            assert report.fits, f"{where}: {report.shared} > {a.smem_per_block} bytes of shared memory"
            if isinstance(variant.params.tile, GemmTile):
                problem = cm.problem_of(step.node, c.graph)
                assert report.shared <= problem.smem(variant.params.tile, a) + cm.SMEM_RESERVE, where
                fast = variant.params.tile.block_m >= a.fast_mma_min_m
                assert report.mma == (a.mma if fast else "mma.sync"), f"{where}: {report.mma}"
    assert seen


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_sync_mma_tiles_keep_their_registers(arch):
    """On mma.sync (every tile on sm80/86/89/120, BLOCK_M below 64 on sm90/100) a tile holds its accumulators
    and one K step of both operands in registers: the chosen tiles stay within `MAX_SYNC_REGS`."""
    a = ARCHS[arch]
    for model in MODELS:
        c = compiled(model, arch)
        for n in c.graph.nodes:
            if n.op != "grouped_gemm":
                continue
            p = cm.problem_of(n, c.graph)
            for tile in n.attr["tiles"].values():
                if sync_mma(tile.block_m, a) and not p.fp32:
                    regs = sync_regs(p.acc_regs(tile), p.stage_bytes(tile), tile.num_warps)
                    assert regs <= MAX_SYNC_REGS, (model, n.name, tile, regs)


@pytest.mark.parametrize("arch", aot_archs("sm90"))
def test_large_t_gemms_compile_without_spills(arch):
    """The grouped GEMMs of the largest bucket of Mixtral and DeepSeek-V3 (``MOEC_AOT_ALL=1``: of every model)
    compile without register spills (ptxas -v on the PTX). Before the register bound, sm80's 128x128 GLU
    tiles compiled to 32 registers and ~14 KB of spills per thread. (Some decode tiles still spill a few
    bytes where ptxas allocates far fewer registers than the tile needs: DeepSeek-V3's 16x32x256 on sm80.)"""
    for model in (MODELS if AOT_ALL else ("mixtral-8x7b", "deepseek-v3")):
        c = compiled(model, arch)
        for step, variant, rec in record_variants(c, T=2000):
            if step.node.op != "grouped_gemm" or variant.bound is not None:
                continue
            report = compile_launch(rec, arch)
            assert report.spills == 0, (model, step.node.name, variant.params.tile, arch, report.registers, report.spills)


def test_aot_sees_pipelined_shared_memory():
    """With the JIT's specializations recorded, a 4-stage wgmma tile takes 4 stages of operands."""
    c = compiled("mixtral-8x7b", "sm90")
    (step, variant, rec), = [r for r in record_variants(c, {"h"}) if r[1].bound is None]
    tile = variant.params.tile
    assert rec.specialization.get("stride_ak") == "1"
    report = compile_launch(rec, "sm90")
    stage = (tile.block_m + 2 * tile.block_n) * tile.block_k * 2
    assert report.shared >= tile.num_stages * stage


# ---- the runtime picks the bucket of T ----------------------------------------------------------

def test_program_launches_the_bucket_of_T(tmp_path):
    spec = MoESpec(64, 128, RouterConfig(8, 2, renormalize=True))
    c = compile_spec(spec, torch.float32, ("y",), ARCHS["sm90"])    # sm90 tiles, run interpreted
    up = next(s for s in kernel_steps(c) if s.node.name == "h")
    assert len(up.variants) >= 2
    names = {v.kernel.fn_name for s in kernel_steps(c) for v in s.variants}
    assert len(names) == sum(len(s.variants) for s in kernel_steps(c))      # one kernel per bucket
    for v in up.variants:
        src = v.kernel.source
        assert f"# tile ({bucket_text(*v.params.bucket)}): BLOCK_M={v.params.tile.block_m} " in src
        assert "tiles={" in src.splitlines()[1]                              # the IR node, every bucket
    gen = torch.Generator().manual_seed(0)
    E, d, f = 8, 64, 128
    w = MoEWeights(w_router=torch.randn(E, d, generator=gen) / 8, w_up=torch.randn(E, f, d, generator=gen) / 8,
                   w_down=torch.randn(E, d, f, generator=gen) / 11, w_gate=torch.randn(E, f, d, generator=gen) / 8)
    for T_ in (4, 300):
        x = torch.randn(T_, d, generator=gen)
        with recording() as recs:
            (y,) = c.program.run(moe_inputs(x, w))
        want = up.variant(T_).kernel.fn_name
        assert want in {r.kernel.fn_name for r in recs}, (T_, want)
        assert want.endswith(bucket_suffix(*up.variant(T_).params.bucket))
        torch.testing.assert_close(y, ref.moe(x, w, spec)[0], rtol=1e-4, atol=1e-4)
    d = c.dump(tmp_path)
    assert len(list((d / "kernels").glob("h.*.py"))) == len(up.variants)
    assert set(c.tiles()["h"]["buckets"]) == {bucket_text(*v.params.bucket) for v in up.variants}


# ---- the backward's grouped GEMMs (passes/grad_costs.py) -----------------------------------------

def compiled_backward(model: str, arch: str, dtype=torch.bfloat16):
    from moec.compiler import BackwardRecipe, MoERecipe, compile_program
    return compile_program(BackwardRecipe(MoERecipe(MODELS[model])), dtype, ARCHS[arch])


GRAD_OPS = ("grouped_dgrad", "grouped_wgrad")


@pytest.mark.parametrize("arch", aot_archs("sm90"))
def test_backward_tiles_come_from_the_cost_model(arch):
    """Per bucket, the model's best legal tile; at large T the fast tensor-core family (the MMA's rows are a
    dgrad's BLOCK_M and a wgrad's BLOCK_N), at decode a dgrad of 16-row tiles."""
    a = ARCHS[arch]
    for model in MODELS:
        c = compiled_backward(model, arch)
        steps = [s for s in kernel_steps(c) if s.node.op in GRAD_OPS]
        assert {s.node.op for s in steps} == set(GRAD_OPS)
        for step in steps:
            assert step.node.attr["tile_source"] == "cost model"
            problem = cm.problem_of(step.node, c.graph)
            assert problem.key.startswith(step.node.op)
            for (lo, hi), bound in zip(bucket_ranges(BUCKETS), BUCKETS):
                tile = step.variant(lo).params.tile
                assert problem.fits(tile, a), (model, step.node.name, tile)
                best = cm.score(problem, a, lo, hi, cm.choose(problem, a, lo, hi))   # or a larger bucket's near tie
                assert cm.score(problem, a, lo, hi, tile) <= best * (1 + cm.NEAR_TIE), (model, step.node.name, bound)
            large = step.variant(16384).params.tile
            rows = large.block_n if step.node.op == "grouped_wgrad" else large.block_m
            assert rows >= max(a.fast_mma_min_m, 64), f"{model} %{step.node.name} on {arch}: {large}"
            if step.node.op == "grouped_dgrad":
                assert step.variant(1).params.tile.block_m == 16, f"{model} %{step.node.name}"


def test_backward_problems_count_what_they_move():
    c = compiled_backward("qwen3-30b-a3b", "sm90")
    p = {s.node.name: cm.problem_of(s.node, c.graph) for s in kernel_steps(c) if s.node.op in GRAD_OPS}
    d, f, E, k = 2048, 768, 128, 8
    act, dx, wd = p["d_gate_rows"], p["dx_rows"], p["d_w_down"]
    t = 4096
    assert act.flops(t) == 2 * k * t * f * d and dx.flops(t) == 2 * 2 * k * t * d * f     # two products
    assert wd.flops(t) == 2 * k * t * d * f and wd.programs(GemmTile(64, 128, 128), t, cm.Num) == E * 16 * 6
    # the activation's backward reads gate and up and writes d gate, d up and h besides its output
    plain = dataclasses.replace(act, act_grad=False, act_glu=False)
    assert act.bytes(t, cm.Num) - plain.bytes(t, cm.Num) >= k * t * f * 2 * 4
    # a wgrad re-reads an expert's rows per tile only when they do not fit in L2
    tile = GemmTile(64, 64, 64)
    assert wd.traffic(tile, ARCHS["sm90"], 16) == wd.bytes(16, cm.Num)
    assert wd.traffic(tile, ARCHS["sm90"], 1 << 20) > wd.bytes(1 << 20, cm.Num)


@pytest.mark.parametrize("arch", AOT_BACKWARD_ARCHS)
def test_backward_tiles_compile_and_fit(arch):
    """Every bucket's backward grouped GEMM of DeepSeek-V3 (``MOEC_AOT_ALL=1``: of every model) compiles for the
    arch at its real size, fits, stays within the model's shared-memory estimate and uses the MMA family its
    tile allows."""
    a = ARCHS[arch]
    seen = set()
    for model in (MODELS if AOT_ALL else ["deepseek-v3"]):
        c = compiled_backward(model, arch)
        nodes = {s.node.name for s in kernel_steps(c) if s.node.op in GRAD_OPS}
        for step, variant, rec in record_variants(c, nodes):
            key = (variant.params.tile, rec.kernel.fn_name.split("_T")[0], tuple(sorted(rec.constexprs.items())))
            if key in seen:
                continue
            seen.add(key)
            report = compile_launch(rec, arch)
            tile = variant.params.tile
            where = f"{model} %{step.node.name} {tile} on {arch}"
            assert report.fits, f"{where}: {report.shared} > {a.smem_per_block} bytes of shared memory"
            assert report.shared <= cm.problem_of(step.node, c.graph).smem(tile, a) + cm.SMEM_RESERVE, where
            rows = tile.block_n if step.node.op == "grouped_wgrad" else tile.block_m
            assert report.mma == (a.mma if rows >= a.fast_mma_min_m else "mma.sync"), f"{where}: {report.mma}"
    assert seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_fp32_pair_buffer(dtype):
    """A bf16 layer's down projection writes each pair's weighted row in bf16 (half the bytes of fp32; fp32's
    range) and the reduce sums a token's rows in fp32 in slot order; an fp16 layer keeps fp32 rows (fp16's range
    is too small for rows whose sum is not: tests/test_backward.py). The cost model counts those bytes."""
    size = 2 if dtype == torch.bfloat16 else 4
    for model in MODELS:
        c = compile_spec(MODELS[model], dtype, ("y",), ARCHS["sm90"])
        (pairs,) = [n for n in c.graph.nodes if n.op == "grouped_gemm" and n.attr["scatter"]]
        assert pairs.types[0].torch_dtype.itemsize == size, model
        assert cm.problem_of(pairs, c.graph).out_size == size
        (red,) = [n for n in c.graph.nodes if n.op == "reduce_topk"]
        assert cm.problem_of(red, c.graph).y_size == size


@pytest.mark.parametrize("arch", ("sm86", "sm90") if LARGE else ("sm86",))
def test_fp32_scaled_weight_gradient_tiles_fit(arch):
    """fp32 operands (the exact path): the routing-weight-scaled weight gradient stages its scaled rows in shared
    memory outside the pipeline; the model counts them, so every bucket's tile fits (sm86: 99 KiB per block)."""
    a = ARCHS[arch]
    c = compiled_backward("qwen3-30b-a3b", arch, torch.float32)
    nodes = {s.node.name for s in kernel_steps(c) if s.node.op == "grouped_wgrad" and "scale" in s.node.ins}
    assert nodes
    seen = set()
    for step, variant, rec in record_variants(c, nodes):
        if variant.params.tile in seen:
            continue
        seen.add(variant.params.tile)
        report = compile_launch(rec, arch)
        estimate = cm.problem_of(step.node, c.graph).smem(variant.params.tile, a) + cm.SMEM_RESERVE
        assert report.fits and report.shared <= estimate, (step.node.name, variant.params.tile, report.shared, estimate)


def test_persistent_tiles_are_candidates_and_skip_the_surplus():
    """On wgmma / tcgen05 arches a forward grouped GEMM's fast-MMA tiles are also candidates as persistent
    grids (programs per SM = the tile's occupancy); such a grid starts at most a slot's worth of programs,
    not one per tile and per surplus row tile of its bound, which is all the model credits it with (the
    per-tile prologue is the same). Not on sm80, not for the backward's."""
    from moec.passes.cost_terms import PROGRAM_S
    up = cm.GemmProblem(256, True, 8, 1, 2048, 7168, True, 2, 2, False, True, False, "bf16", "bf16", 8)
    for name in ("sm90", "sm100"):
        a = ARCHS[name]
        persistent = [c for c in cm.candidates(up, a) if c.persistent]
        assert persistent and all(c.block_m >= a.fast_mma_min_m for c in persistent)
        for tile in persistent[:20]:
            plain = dataclasses.replace(tile, persistent=0)
            assert tile.persistent == up.slots(plain, a) // a.sms
            cols = -(-up.n // tile.block_n)
            for t in (64, 4096):
                launched = up.launched_row_tiles(plain, t) * cols          # one program per possible tile
                tiles = up.expected_row_tiles(plain, t) * cols
                assert launched >= tiles
                saved = (launched - min(launched, up.slots(plain, a))) / a.sms * PROGRAM_S
                assert up.time(plain, a, t) - up.time(tile, a, t) == pytest.approx(saved)
    assert not any(c.persistent for c in cm.candidates(up, ARCHS["sm80"]))
    back = compiled_backward("mixtral-8x7b", "sm90")
    dgrad = [cm.problem_of(n, back.graph) for n in back.graph.nodes if n.op == "grouped_dgrad"]
    assert dgrad and not any(c.persistent for p in dgrad for c in cm.candidates(p, ARCHS["sm90"]))
