"""``benchmarks/moe.py`` on the CPU: ``--small`` runs all four layers with every method that works
on a CPU and checks each against eager in the same run (moec disagreeing fails the run, a peer
disagreeing is marked INVALID); the floor's terms match the issue's hand-computed H100 floors; the
target verdicts and the ``--merge`` summary are pure functions of rows, checked on fabricated
rows; the plot is made or its absence is announced; ``--tune-only`` without a GPU tunes nothing."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/moe.py, importing its siblings moe_layers and moe_report from its own folder as
    ``python benchmarks/moe.py`` does."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("moec_bench_moe", BENCHMARKS / "moe.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def report(bench):
    """benchmarks/moe_report.py: the targets, tables, plot and merge (the module moe.py imported)."""
    return sys.modules["moe_report"]


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# ---- the --small run ---------------------------------------------------------------------------------

def test_small_runs_every_model_and_method_on_cpu(bench, report, tmp_path, capsys):
    """Every method on two models (every model under HYPOTHESIS_PROFILE=large: torch.compile builds per model)."""
    every = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "olmoe"]
    models = every if os.environ.get("HYPOTHESIS_PROFILE") == "large" else ["mixtral-8x7b", "deepseek-v3"]
    rc = bench.main(["--small", "--tokens", "2", "--out", str(tmp_path), "--models", *models])
    out = capsys.readouterr().out
    assert rc == 0 and "GPU timings were NOT measured" in out and "| moec (ms) |" in out
    doc = json.loads((tmp_path / "moe_small_cpu.json").read_text())
    rows = doc["rows"]
    assert [r["model"] for r in rows] == models
    for r in rows:
        assert r["verified"] and r["gpu_timed"] is False and r["floor_s"] is None and r["moec_entry"] == "moec.ops.moe"
        for m in ("moec", "eager", "compile", "grouped_mm"):
            assert r[f"{m}_status"] == "ok" and r[f"{m}_s"] > 0 and r[f"{m}_vs_eager_rel_err"] < 1e-3, (m, r)
        assert r["moec+graph_status"] == "unavailable" and r["moec_floor_pct"] is None
        assert r["best_peer"] in report.PEERS and r["moec_over_best_peer"] > 0
    assert all(s.startswith("not measured") for per in doc["verdicts"].values() for v in per.values()
               for s in v.values())
    assert (tmp_path / "moe_small_cpu.csv").read_text().startswith("T,")
    assert f"VERDICT {models[-1]} moec: " in (tmp_path / "moe_small_cpu.txt").read_text()
    if _has_matplotlib():
        assert (tmp_path / "moe_small_cpu.png").stat().st_size > 0
    else:
        assert "PLOT SKIPPED: matplotlib is not installed" in out and not (tmp_path / "moe_small_cpu.png").exists()


def test_a_moec_mismatch_fails_the_run(bench, tmp_path, capsys, monkeypatch):
    real = bench.eager_moe
    monkeypatch.setattr(bench, "eager_moe", lambda x, w, spec: real(x, w, spec) * 1.5)
    rc = bench.main(["--small", "--models", "olmoe", "--tokens", "3", "--methods", "moec", "--tag", "bad",
                     "--out", str(tmp_path)])
    assert rc == 1 and "MISMATCH" in capsys.readouterr().out
    row = json.loads((tmp_path / "moe_small_cpu_bad.json").read_text())["rows"][0]
    assert row["verified"] is False and row["moec_status"] == "invalid"


def test_a_wrong_peer_is_invalid_not_faster(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "grouped_mm_moe", lambda x, w, spec: torch.zeros_like(x))
    rc = bench.main(["--small", "--models", "olmoe", "--tokens", "3", "--methods", "moec", "eager", "grouped_mm",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "moe_small_cpu.json").read_text())["rows"][0]
    assert rc == 0 and row["grouped_mm_status"] == "invalid" and row["best_peer"] == "eager"
    assert "INVALID" in out and "disagrees with eager" in row["grouped_mm_note"]


def test_moec_row_refuses_the_eager_fallback(bench):
    with pytest.raises(RuntimeError, match="eager fallback"):
        bench.kernels_ran(lambda: None)


def test_tune_only_without_a_gpu_tunes_nothing(bench, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    monkeypatch.setenv("MOEC_TUNE_FILE", str(tmp_path / "tune.json"))
    assert bench.main(["--tune-only", "--models", "olmoe", "--out", str(tmp_path)]) == 0
    assert "nothing tuned" in capsys.readouterr().out and not (tmp_path / "tune.json").exists()


# ---- pieces: floor, ceilings, graph capture, grouped_mm -------------------------------------------------

@pytest.mark.parametrize("model,T,hit,floor_ms", [
    ("mixtral-8x7b", 1, 2, 0.235), ("mixtral-8x7b", 4096, 8, 3.65), ("mixtral-8x7b", 16384, 8, 14.6),
    ("qwen3-30b-a3b", 1, 8, 0.025), ("qwen3-30b-a3b", 4096, 128, 0.41), ("qwen3-30b-a3b", 16384, 128, 1.57),
    ("deepseek-v3", 4096, 256, 7.56),
])
def test_floor_matches_the_issue(bench, report, model, T, hit, floor_ms):
    """The issue's H100 floors (794 TFLOP/s, 3.0 TB/s), given to 2-3 digits."""
    spec = bench.MODELS[model].spec
    got = report.floor_time(*bench.floor_terms(spec, T, hit, 2), 794e12, 3.0e12)
    assert got * 1e3 == pytest.approx(floor_ms, rel=0.02)


def test_deepseek_decode_floor_reads_the_shared_expert(bench, report):
    """The issue's DeepSeek-V3 T=1 floor (0.235 ms) leaves out the shared expert's 88 MB; this
    floor reads them (every call needs them), so it is 0.029 ms higher."""
    spec = bench.MODELS["deepseek-v3"].spec
    flops, nbytes = bench.floor_terms(spec, 1, 8, 2)
    shared = 3 * 7168 * 2048 * 2
    assert (nbytes - shared) / 3.0e12 * 1e3 == pytest.approx(0.235, rel=0.01)
    assert report.floor_time(flops, nbytes, 794e12, 3.0e12) * 1e3 == pytest.approx(0.265, rel=0.01)
    assert report.floor_time(flops, nbytes, None, None) is None


def test_ceilings_fall_back_to_wall_clock_on_cpu(bench):
    peak, bandwidth = bench.ceilings("cpu", n=64, copy_elems=1 << 14)
    assert math.isfinite(peak) and peak > 0 and math.isfinite(bandwidth) and bandwidth > 0


def test_capture_graph_warms_up_then_captures_once(bench):
    calls, events = [], []

    class Ctx:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    stream = SimpleNamespace(wait_stream=lambda s: None)
    graph = SimpleNamespace(replay=lambda: events.append("replay"))
    cuda = SimpleNamespace(Stream=lambda: stream, current_stream=lambda: stream, stream=lambda s: Ctx("side stream"),
                           CUDAGraph=lambda: graph, graph=lambda g: Ctx("capture"))

    def run():
        calls.append(list(events))
        return len(calls)
    replay, out = bench.capture_graph(run, cuda)
    assert out == 3 and replay is graph.replay
    assert [c[-1] for c in calls] == ["enter side stream", "enter side stream", "enter capture"]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm in this build")
@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "olmoe"])
def test_grouped_mm_matches_eager(bench, model):
    spec = bench.MODELS[model].small
    w = bench.make_weights(spec, torch.float32, "cpu")
    for T in (1, 7):
        x = torch.randn(T, spec.hidden, generator=torch.Generator().manual_seed(T))
        assert bench.rel_err(bench.grouped_mm_moe(x, w, spec), bench.eager_moe(x, w, spec)) < 1e-5


# ---- targets, units, merge: fabricated rows -------------------------------------------------------------

def _row(T, moec, floor, *, model="mixtral-8x7b", **peers):
    """A measured GPU row: moec's and each peer's seconds (None: the method failed)."""
    r = {"model": model, "T": T, "gpu_timed": True, "floor_s": floor, "flops": 1.0, "bytes": 1.0,
         "methods": ["moec", *peers]}
    for m, t in {"moec": moec, **peers}.items():
        r[f"{m}_s"], r[f"{m}_status"] = t, "ok" if t is not None else "error"
    return r


def _good_rows(override=None):
    """moec at 1.1x the floor everywhere, every peer slower; ``override``: {T: fields}."""
    rows = [_row(T, 1.1e-3 * T, 1e-3 * T, eager=3e-3 * T, compile=2e-3 * T, grouped_mm=1.5e-3 * T)
            for T in (1, 16, 128, 1024, 4096, 16384)]
    for r in rows:
        r.update((override or {}).get(r["T"], {}))
    return rows


def test_targets_per_row(report):
    r = _row(16, 2e-3, 1e-3, eager=8e-3, compile=None, grouped_mm=4e-3)
    t = report.row_targets(r, ["moec"])
    assert t["best_peer"] == "grouped_mm" and t["best_peer_s"] == 4e-3
    assert t["moec_over_floor"] == pytest.approx(2.0) and t["moec_over_best_peer"] == pytest.approx(0.5)
    r["grouped_mm_status"] = "invalid"                 # a wrong output is never the peer to beat
    assert report.best_peer(r) == ("eager", 8e-3)


def test_verdict_pass(report):
    v = report.verdict(_good_rows(), "moec")
    assert all(s.startswith("PASS") for s in v.values()), v


def test_verdict_fails_on_floor_and_peers(report):
    rows = _good_rows({1: {"moec_s": 2e-3}, 4096: {"moec_s": 4096e-3 * 1.3, "compile_s": 4096e-3 * 1.25}})
    v = report.verdict(rows, "moec")
    assert v["floor T<=16 (1.5x)"] == "FAIL (T=1: 2.00x)"
    assert v["floor T>=1024 (1.2x)"] == "FAIL (T=4096: 1.30x)"
    assert v[report.PEER_TARGET].startswith("FAIL") and "T=4096: compile" in v[report.PEER_TARGET]
    assert "T=1: grouped_mm 1.33x faster" in v[report.PEER_TARGET]


def test_verdict_not_measured_and_invalid(report):
    rows = _good_rows({16384: {"compile_s": None, "compile_status": "error"},
                         16: {"grouped_mm_s": 1e-6, "grouped_mm_status": "invalid"}})
    v = report.verdict(rows, "moec")
    assert v[report.PEER_TARGET].startswith("not measured (compile@T=16384)")
    assert "INVALID peers left out: grouped_mm@T=16" in v[report.PEER_TARGET]
    assert report.verdict(rows[:4], "moec")["floor T>=1024 (1.2x)"] == "not measured (T=4096, T=16384)"
    wrong = _good_rows({128: {"moec_status": "invalid"}})
    assert report.verdict(wrong, "moec")[report.PEER_TARGET].startswith("FAIL (T=128: wrong output")
    cpu = [dict(r, gpu_timed=False) for r in _good_rows()]
    assert set(report.verdict(cpu, "moec").values()) == {"not measured (no GPU timing)"}


def test_times_are_milliseconds_everywhere(report):
    assert report.fmt_ms(0.1807) == "180.7" and report.fmt_ms(25.3e-6) == "0.02530" and report.fmt_ms(None) == "n/a"
    assert report.fmt_ms(3.635e-3) == "3.635" and report.fmt_ms(18.0224) == "18022"
    rows = _good_rows()
    for r in rows:
        r.update(report.row_targets(r, ["moec"]))
    text = report.table(rows, ["moec", "eager", "compile", "grouped_mm"])
    assert "| moec (ms) |" in text and "| floor (ms) |" in text and " us" not in text
    assert "| 18022 |" in text and "| 1.10x |" in text and "| grouped_mm 24576 | 0.73x |" in text


def _doc(rows, tuned=False, peak=800e12, bandwidth=3e12, device="NVIDIA H100"):
    return {"meta": {"gpu_timed": True, "device": device, "arch": "sm90", "tuned": tuned, "peak_flops": peak,
                     "bandwidth_bytes_s": bandwidth}, "rows": rows}


def test_merge_puts_every_peer_and_t_in_one_row(report):
    fast = [_row(T, 1e-3, None, eager=3e-3, grouped_mm=2e-3) for T in (1, 4096)]
    comp = [_row(T, None, None, compile=4e-3) for T in (1, 4096)]
    for r in comp:
        r["methods"] = ["compile"]
    tuned = [_row(T, 0.9e-3, None) for T in (1, 4096)]
    meta, rows, methods = report.merge_runs([_doc(fast), _doc(comp, peak=900e12), _doc(tuned, tuned=True)])
    assert methods == ["moec", "moec[tuned]", "eager", "compile", "grouped_mm"]
    assert [r["T"] for r in rows] == [1, 4096] and meta["peak_flops"] == 900e12
    assert rows[1]["compile_s"] == 4e-3 and rows[1]["moec[tuned]_s"] == 0.9e-3 and rows[1]["moec_s"] == 1e-3


def test_merge_cli_writes_one_summary(bench, report, tmp_path, capsys):
    runs = tmp_path / "results"
    runs.mkdir()
    fast = [_row(T, 1.1e-3 * T, None, eager=3e-3 * T, grouped_mm=2e-3 * T) for T in report.TOKENS]
    comp = [_row(T, None, None, compile=2e-3 * T) for T in report.TOKENS[:-1]]
    for r in comp:
        r["methods"] = ["compile"]
    for name, rows in (("moe_sm90_mixtral.json", fast), ("moe_sm90_mixtral_compile.json", comp)):
        (runs / name).write_text(json.dumps(_doc(rows, peak=1e6, bandwidth=1e6)))     # floor: 1 us
    assert bench.main(["--merge", str(runs), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "moe_sm90_summary.json").read_text())
    v = doc["verdicts"]["mixtral-8x7b"]["moec"]
    assert v[report.PEER_TARGET] == "not measured (compile@T=16384)"
    assert "VERDICT mixtral-8x7b moec:" in out and "compile (ms)" in out
    assert (_has_matplotlib() and (tmp_path / "moe_sm90_summary.png").exists()) or "PLOT SKIPPED" in out


def test_plot_is_made_or_its_absence_announced(report, tmp_path, monkeypatch):
    rows = [report.annotate(r, None, None, ["moec", "eager", "compile", "grouped_mm"]) for r in _good_rows()]
    if _has_matplotlib():
        png, why = report.plot(rows, ["moec", "eager", "compile", "grouped_mm"], tmp_path / "gpu.png", "test")
        assert png == tmp_path / "gpu.png" and png.stat().st_size > 0 and why is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if not installed
    png, why = report.plot(rows, ["moec"], tmp_path / "none.png", "test")
    assert png is None and "pip install -e '.[bench]'" in why and not (tmp_path / "none.png").exists()
