"""Autotuning without a GPU: the tune file's format, merge and atomic write, the kernel keys, the
lookup that choose-tiles makes (and what it says about entries it ignores), the winner selection,
a whole `tune` run driven by a fake timer (the kernels run in the Triton interpreter; the timer
reads the launched tile and makes one faster), and `moec.tune` on a compiled module."""
from __future__ import annotations

import json
import re

import pytest
import torch

from moec.compiler import compile_spec
from moec.passes import cost_model as cm
from moec import autotune
from moec.runtime.arch import ARCHS
from moec.runtime.launch import recording
from moec.ir.tiles import BUCKETS, GemmTile, RouteTile, RowTile, bucket_ranges
from moec.spec import MoESpec, MoEWeights, RouterConfig

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPEC = MoESpec(32, 64, RouterConfig(8, 2, renormalize=True))


@pytest.fixture(autouse=True)
def tune_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_TUNE_FILE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("MOEC_TUNE_DEVICE", raising=False)
    autotune.invalidate()
    yield tmp_path / "tune.json"
    autotune.invalidate()


def entry(tile, us=1.0):
    return {"tile": autotune.tile_to_json(tile), "us": us, "T": 16}


# ---- the file ---------------------------------------------------------------------------------

def test_file_format_and_merge(tune_env):
    assert autotune.tune_file() == tune_env and autotune.load() == autotune.empty()
    a, b = GemmTile(16, 64, 128, 4, 4), GemmTile(128, 128, 64, 8, 4)
    autotune.save("GPU A", "sm90", {"k1": {"T<=16": entry(a)}})
    autotune.save("GPU A", "sm90", {"k1": {"T>1024": entry(b)}, "k2": {"T<=16": entry(a)}})
    autotune.save("GPU B", "sm80", {"k1": {"T<=16": entry(b)}})
    data = json.loads(tune_env.read_text())
    assert data["format"] == "moec-tune/2"
    assert set(data["devices"]) == {"GPU A", "GPU B"} and data["devices"]["GPU B"]["arch"] == "sm80"
    assert set(data["devices"]["GPU A"]["kernels"]["k1"]) == {"T<=16", "T>1024"}      # merged, not replaced
    assert autotune.tile_from_json(data["devices"]["GPU A"]["kernels"]["k1"]["T>1024"]["tile"]) == b
    assert autotune.load() == data


def test_tile_json_round_trip_and_malformed_entries():
    for t in (GemmTile(16, 32, 64, 4, 2), RouteTile(16, 64, 4, 3), RowTile(4, 1024, 4, 1)):
        assert autotune.tile_from_json(autotune.tile_to_json(t)) == t
    assert autotune.tile_from_json({"type": "Nope", "block_m": 16}) is None
    assert autotune.tile_from_json({"type": "GemmTile", "block_m": 16}) is None           # missing fields
    assert autotune.tile_from_json({"type": "GemmTile", "block_m": 24, "block_n": 16, "block_k": 16}) is None


def test_atomic_write_leaves_the_old_file_on_failure(tune_env, monkeypatch):
    autotune.save("GPU A", "sm90", {"k1": {"T<=16": entry(GemmTile(16, 64, 128))}})
    before = tune_env.read_text()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(autotune.json, "dump", broken)
    with pytest.raises(OSError):
        autotune.save("GPU A", "sm90", {"k2": {"T<=16": entry(GemmTile(16, 64, 128))}})
    assert tune_env.read_text() == before
    assert [p.name for p in tune_env.parent.iterdir()] == ["tune.json"]              # no temporary left


def test_a_different_format_is_refused(tune_env):
    tune_env.write_text(json.dumps({"format": "something-else", "devices": {}}))
    with pytest.raises(ValueError, match="moec-tune/2"):
        autotune.load()


def test_a_format_1_file_is_ignored_with_a_warning_and_not_merged_into(tune_env, monkeypatch):
    """Format 1's keys were ambiguous: compiles warn and use the cost model, tune refuses up front."""
    old = {"format": "moec-tune/1", "devices": {"Fake GPU": {"arch": "sm90", "kernels": {}}}}
    tune_env.write_text(json.dumps(old))
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    with pytest.warns(autotune.TuneWarning, match="older moec"):
        c = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    assert c.tuned_from == "" and all(b["source"] == "cost model" for b in c.tiles()["h"]["buckets"].values())
    with pytest.raises(ValueError, match="older moec"):
        autotune.tune(c.program, {}, timer=lambda fn: 1.0, device="Fake GPU")
    assert json.loads(tune_env.read_text()) == old


# ---- kernel keys ----------------------------------------------------------------------------------

def _keys(spec, dtype=torch.float16):
    c = compile_spec(spec, dtype, ("y",), ARCHS["sm90"])
    return {s.node.name: autotune.kernel_key(s.node, c.graph) for s in c.program.steps if s.variants}


def test_kernel_keys_name_what_changes_the_kernel():
    top2, top1 = _keys(MoESpec(32, 64, RouterConfig(8, 2))), _keys(MoESpec(32, 64, RouterConfig(8, 1)))
    assert "M=2T" in top2["pairs_out"] and "M=T" in top1["pairs_out"]     # the down projection: rows = kT
    assert top2["pairs_out"] != top1["pairs_out"] and "scatter scale" in top2["pairs_out"]
    sigmoid = _keys(MoESpec(32, 64, RouterConfig(8, 2, score="sigmoid")))
    grouped = _keys(MoESpec(32, 64, RouterConfig(8, 2, n_group=4, topk_group=2)))
    assert len({k["ids"] for k in (top2, sigmoid, grouped)}) == 3          # the routing kernel ("ids")
    assert "score=softmax" in top2["ids"] and "score=sigmoid" in sigmoid["ids"]
    assert "n_group=4 " in grouped["ids"] and "topk_group=2" in grouped["ids"]
    assert "activation=silu" in top2["h"]                                  # the fused epilogue


# ---- lookup by choose-tiles ---------------------------------------------------------------------

def _up_node(c):
    return next(n for n in c.graph.nodes if n.name == "h")


def test_choose_tiles_uses_tuned_entries_first(tune_env, monkeypatch):
    c = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    key = autotune.kernel_key(_up_node(c), c.graph)
    model = _up_node(c).attr["tiles"]
    tuned = GemmTile(32, 32, 32, 4, 2)
    assert tuned not in model.values()
    autotune.save("Fake GPU", "sm90", {key: {"T<=128": entry(tuned)}})
    # no device of that name here: the entry does not apply
    autotune.invalidate()
    assert _up_node(compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])).attr["tiles"] == model
    # compiling for the tuned device (by name): the T <= 128 bucket takes the tuned tile
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    autotune.invalidate()
    c2 = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    step = next(s for s in c2.program.steps if s.node.name == "h")
    assert step.variant(100).params.tile == tuned and step.variant(17).params.tile == tuned
    assert step.variant(5000).params.tile == model[None]
    # provenance: tiles.json's source, the sources per bucket
    sources = {b: v["source"] for b, v in c2.tiles()["h"]["buckets"].items()}
    assert sources["17 <= T <= 128"] == "tune file" and "cost model" in sources.values(), sources
    assert c2.sources["h"][128] == "tune file" and c2.sources["h"][None] == "cost model"
    assert c2.tuned_from.startswith("Fake GPU in ") and not c2.tune_notes
    # another arch does not take an sm90 device's entries
    autotune.invalidate()
    c3 = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm80"])
    assert tuned not in _up_node(c3).attr["tiles"].values()


def test_tuned_tiles_that_do_not_fit_are_ignored(tune_env, monkeypatch):
    c = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    key = autotune.kernel_key(_up_node(c), c.graph)
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    huge = GemmTile(128, 256, 256, 4, 5)                    # accumulators and shared memory too large
    autotune.save("Fake GPU", "sm90", {key: {"T<=16": entry(huge), "T<=128": {"tile": {"type": "GemmTile"}}}})
    with pytest.warns(autotune.TuneWarning) as warned:      # said, not silent
        c2 = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    text = " ".join(str(w.message) for w in warned)
    assert "T<=16: entry ignored" in text and "not a legal tile on sm90" in text and "malformed entry" in text
    tiles = _up_node(c2).attr["tiles"]
    assert huge not in tiles.values() and tiles == _up_node(c).attr["tiles"]
    assert len(c2.tune_notes) == 2 and all(n.startswith("h T<=") for n in c2.tune_notes)
    assert set(c2.sources["h"].values()) == {"cost model"}


# ---- selection ----------------------------------------------------------------------------------

def test_select():
    a, b, c = GemmTile(16, 16, 64), GemmTile(16, 32, 64), GemmTile(32, 32, 64)
    assert autotune.select([(a, 1.0), (b, 0.5), (c, 0.7)], a) == b
    assert autotune.select([(a, 1.0), (b, 0.98)], a) == a              # within 3%: keep the current tile
    assert autotune.select([(a, 1.0), (b, 0.96)], a) == b
    assert autotune.select([(a, None), (b, 2.0), (c, None)], a) == b  # a failed current tile loses
    assert autotune.select([(a, None), (b, None)], a) == a
    assert autotune.select([], a) == a


def test_agreement_check():
    w = {"out": torch.randn(8, 4), "ids": torch.arange(200, dtype=torch.int32)}
    assert autotune._agrees({k: v.clone() for k, v in w.items()}, w)
    assert not autotune._agrees({"out": w["out"] * 1.5, "ids": w["ids"]}, w)
    ids = w["ids"].clone()
    ids[0] = 7                                      # one near-tie token routed differently: tolerated
    assert autotune._agrees({"out": w["out"], "ids": ids}, w)
    nan = w["out"].clone()
    nan[0, 0] = float("nan")
    assert not autotune._agrees({"out": nan, "ids": w["ids"]}, w)


def test_tune_needs_a_timer_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    c = compile_spec(SPEC, torch.float32, ("y",), ARCHS["sm90"])
    with pytest.raises(RuntimeError, match="timer="):
        autotune.tune(c.program, {})


# ---- a whole run with a fake timer -----------------------------------------------------------------

def _weights(gen):
    E, d, f = 8, 32, 64
    return MoEWeights(w_router=torch.randn(E, d, generator=gen) / 6, w_up=torch.randn(E, f, d, generator=gen) / 6,
                      w_down=torch.randn(E, d, f, generator=gen) / 8, w_gate=torch.randn(E, f, d, generator=gen) / 6)


def fake_timer(fn):
    """Runs ``fn`` once and prices the tile it launched: narrower N (then fewer stages) is faster."""
    with recording() as recs:
        fn()
    (rec,) = recs
    cx = rec.constexprs
    width = cx.get("BLOCK_N", cx.get("BLOCK_D", cx.get("BLOCK_T")))
    return 1e-6 * (width + 0.1 * rec.num_stages)


def price(tile) -> float:
    """What `fake_timer` says a tile costs."""
    d = tile.as_dict()
    return 1e-6 * (d.get("block_n", d.get("block_d", d.get("block_t"))) + 0.1 * tile.num_stages)


def test_trials_are_distinct_blocks_then_other_orders_of_the_current_tile():
    c = compile_spec(MoESpec(4096, 14336, RouterConfig(8, 2)), torch.bfloat16, ("y",), ARCHS["sm90"])
    step = next(s for s in c.program.steps if s.node.op == "grouped_gemm")
    problem, arch = cm.problem_of(step.node, c.graph), ARCHS["sm90"]
    lo, hi = bucket_ranges(BUCKETS)[-1]
    ranked = [t for _, t in cm.rank(problem, arch, lo, hi)]
    current = ranked[0]
    tried = autotune.trials(problem, arch, lo, hi, current, 5)
    blocks, orders = tried[:5], tried[5:]
    assert len({cm.without_order(t) for t in [current, *blocks]}) == 6
    for t in blocks:      # each in the best-ranked order of its blocks
        assert t == next(r for r in ranked if cm.without_order(r) == cm.without_order(t))
    assert len(orders) == 2 and all(cm.without_order(t) == cm.without_order(current) and t != current for t in orders)
    assert len({t.group_m for t in [current, *orders]}) == 3


def test_tune_with_a_fake_timer(tune_env, monkeypatch, capsys):
    from moec.ir.build import moe_inputs
    c = compile_spec(SPEC, torch.float32, ("y",), ARCHS["sm90"])          # interpreted: fp32
    weights = {k: v for k, v in moe_inputs(torch.zeros(1, 32), _weights(torch.Generator().manual_seed(0))).items()
               if k != "x"}
    sizes = {16: (1, 4), 128: 40}                 # the decode bucket at both of its ends
    calls = []
    got = autotune.tune(c.program, weights, timer=lambda fn: calls.append(1) or fake_timer(fn), device="Fake GPU",
                        candidates=2, buckets=(16, 128), sizes=sizes)
    out = capsys.readouterr().out.splitlines()
    kernels = [s for s in c.program.steps if s.variants]
    done = [ln for ln in out if " done: best " in ln]
    assert len(done) == 2 * len(kernels)                                   # a line per kernel and bucket
    # progress as it goes: a line per candidate, before its kernel's summary, saying where it is
    timed = [ln for ln in out if " tile " in ln and " done: " not in ln]
    assert timed[0].startswith("moec autotune [Fake GPU] T<=16 kernel 1/4 %ids tile 1/") and "(current)" in timed[0]
    assert all(" s" in ln.rsplit("|", 1)[1] for ln in timed)                # elapsed seconds
    assert out.index(timed[0]) < out.index(done[0]) and len(timed) == sum(e["candidates"] for k in got.values()
                                                                           for e in k.values())
    assert len(calls) > len(timed)                                          # T<=16 timed at T=1 and T=4
    data = json.loads(tune_env.read_text())
    assert data["devices"]["Fake GPU"]["kernels"] == got and data["devices"]["Fake GPU"]["arch"] == "sm90"
    ranges = dict(zip(BUCKETS, bucket_ranges(BUCKETS)))
    changed = 0
    for step in kernels:
        problem = cm.problem_of(step.node, c.graph)
        key = autotune.kernel_key(step.node, c.graph)
        for bound in (16, 128):
            e = got[key][f"T<={bound}"]
            Ts = sizes[bound] if isinstance(sizes[bound], tuple) else (sizes[bound],)
            assert e["T"] == list(Ts) and e["candidates"] >= 2
            current = step.variant(Ts[0]).params.tile
            tried = [current] + autotune.trials(problem, ARCHS["sm90"], *ranges[bound], current, 2)
            want = autotune.select([(t, price(t)) for t in tried], current)
            assert autotune.tile_from_json(e["tile"]) == want, (step.node.name, bound)
            changed += want != current
    assert changed                                  # the fake timer made some other tile win
    # a later compile for that device uses the winners
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    c2 = compile_spec(SPEC, torch.float32, ("y",), ARCHS["sm90"])
    for step in (s for s in c2.program.steps if s.variants):
        key = autotune.kernel_key(step.node, c2.graph)
        for bound, T in ((16, 1), (128, 40)):
            assert step.variant(T).params.tile == autotune.tile_from_json(got[key][f"T<={bound}"]["tile"])


def test_sizes_must_lie_in_their_bucket():
    assert autotune._sizes_of(16, 1, 16, {16: (1, 16)}) == (1, 16)
    assert autotune._sizes_of(None, 1025, None, {None: 4096}) == (4096,)
    with pytest.raises(ValueError, match="must lie in the bucket"):
        autotune._sizes_of(128, 17, 128, {128: (16, 128)})


# ---- moec.tune: a module compiled with moec.compile ------------------------------------------------

def test_moec_tune_refreshes_compiled_modules(tune_env, monkeypatch, tmp_path):
    """`moec.tune` tunes the lifted layer's program; the module, compiled and called before, then
    recompiles once with the winners (no stale tiles) and says where its tiles came from."""
    import moec
    from zoo import MixtralMoE
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    torch.manual_seed(0)
    m = moec.compile(MixtralMoE(d=32, f=64, E=8, k=2).eval(), arch="sm90", dump_dir=tmp_path / "dump")
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        y0 = m(x)
    region = m.__dict__["_moec_region"]
    (before,) = region.compiled.values()
    assert "tiles: the cost model's for sm90" in m.explain()
    lines = []
    got = moec.tune(m, x, timer=fake_timer, device="Fake GPU", candidates=1, buckets=(16,), sizes={16: (1, 3)},
                    progress=lines.append)
    assert lines[0].startswith("moec tune: region ") and any(" kernel 2/4 " in ln for ln in lines)
    with torch.no_grad():
        y1 = m(x)
    (after,) = region.compiled.values()
    assert after is not before                                             # recompiled after the tune
    assert torch.allclose(y0, y1, atol=1e-5, rtol=1e-4)
    changed = 0
    for step in (s for s in after.program.steps if s.variants):
        tuned = autotune.tile_from_json(got[autotune.kernel_key(step.node, after.graph)]["T<=16"]["tile"])
        assert step.variant(3).params.tile == tuned
        assert after.variant_source(step, step.variant(3)).startswith("tune file")
        changed += tuned != next(s for s in before.program.steps if s.node.name == step.node.name).variant(3).params.tile
    assert changed
    text = m.explain()
    assert "tuned)" in text and "kernel buckets from the tune file (Fake GPU in " in text
    dumped = json.loads(next((tmp_path / "dump").glob("*/tiles.json")).read_text())
    assert {b["source"] for k in dumped.values() for b in k["buckets"].values()} >= {"tune file"}
    with torch.no_grad():
        m(x)
    assert region.compiled[next(iter(region.compiled))] is after           # once, not at every call


def test_moec_tune_needs_a_lifted_layer():
    import moec
    with pytest.raises(ValueError, match="no MoE layer"):
        moec.tune(moec.compile(torch.nn.Linear(4, 4)), timer=fake_timer, device="Fake GPU")


def test_transformers_experts_program_takes_new_tune_entries(tune_env, monkeypatch):
    """The routed-experts program of ``experts_implementation="moec"`` is compiled by the same driver,
    so a tune file written after its first call reaches it at the next one (it once kept its
    pre-tune tiles for the life of the process)."""
    from moec.compiler import ExpertsRecipe
    from moec.hf.experts import ExpertsRegion
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    region = ExpertsRegion("hf_experts", arch="sm90")
    recipe = ExpertsRecipe(8, 2, 32, 64, "silu", True)
    before = region.compiled_for(recipe, torch.float16, "cpu")
    step = next(s for s in before.program.steps if s.node.op == "grouped_gemm")
    current = step.variant(1).params.tile
    problem = cm.problem_of(step.node, before.graph)
    other = next(t for _, t in cm.rank(problem, ARCHS["sm90"], 1, 16) if t != current)
    autotune.save("Fake GPU", "sm90", {autotune.kernel_key(step.node, before.graph): {"T<=16": entry(other)}})
    after = region.compiled_for(recipe, torch.float16, "cpu")
    assert after is not before
    tuned = next(s for s in after.program.steps if s.node.name == step.node.name)
    assert tuned.variant(1).params.tile == other and after.variant_source(tuned, tuned.variant(1)) == "tune file"
    assert region.compiled_for(recipe, torch.float16, "cpu") is after          # once, not at every call


def test_candidates_agree_with_the_tile_schedule(tune_env):
    """The routing kernel's candidates write the same tile schedule (compared up to its tile count: the rest is
    undefined), and a GEMM candidate of other rows than the schedule's scans the offsets instead of reading
    it: no candidate is dropped as disagreeing, those of another BLOCK_M included."""
    from moec.ir.build import moe_inputs
    E, d, f = 8, 32, 64
    g = torch.Generator().manual_seed(0)
    w = MoEWeights(w_router=torch.randn(E, d, generator=g) / 6, w_up=torch.randn(E, f, d, generator=g) / 6,
                   w_down=torch.randn(E, d, f, generator=g) / 8, w_gate=torch.randn(E, f, d, generator=g) / 6)
    c = compile_spec(MoESpec(d, f, RouterConfig(E, 2, renormalize=True)), torch.float32, ("y",), ARCHS["sm90"])
    assert any("schedule" in n.ins for n in c.graph.nodes if n.op == "grouped_gemm")
    weights = {k: v for k, v in moe_inputs(torch.zeros(1, d), w).items() if k != "x"}
    lines = []
    autotune.tune(c.program, weights, timer=lambda fn: (fn(), 1e-6)[1], device="Fake GPU", candidates=4,
                  buckets=(128,), sizes={128: 40}, progress=lines.append)      # T = 40: the sort after the kernel
    timed = [line for line in lines if " tile " in line and "done" not in line]
    assert timed and not [line for line in lines if "disagrees" in line], lines
    h = next(n for n in c.graph.nodes if n.name == "h")
    rows = {t.block_m for t in h.attr["tiles"].values()}
    tried = {int(m.group(1)) for line in timed for m in [re.search(r"%h tile \d+/\d+ (\d+)x", line)] if m}
    assert tried - rows, (tried, rows)          # candidates of other rows than the schedule's were timed
