"""``benchmarks/moe.py`` on the CPU: ``--small`` runs every quick method, checks moec against eager
in the same run, writes JSON/CSV (and the plot when matplotlib is installed) to the given
directory and says that no GPU timing was measured; the plot's GPU form (ms and % of the floor
per T) renders from rows that carry a floor; ``--tune-only`` without a GPU tunes nothing."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "moe.py"
    spec = importlib.util.spec_from_file_location("moec_bench_moe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_small_runs_on_cpu(bench, tmp_path, capsys):
    rc = bench.main(["--small", "--models", "deepseek", "mixtral", "--tokens", "5",
                     "--methods", "moec", "eager", "grouped_mm", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "GPU timings were NOT measured" in out
    rows = json.loads((tmp_path / "moe_small_cpu.json").read_text())["rows"]
    assert [(r["model"], r["T"]) for r in rows] == [("deepseek-v3", 5), ("mixtral-8x7b", 5)]
    for r in rows:
        assert r["verified"] and r["moec_vs_eager_rel_err"] < 1e-3 and r["gpu_timed"] is False
        assert r["moec_s"] > 0 and r["eager_s"] > 0 and r["floor_s"] is None and r["moec_floor_pct"] is None
        assert r["grouped_mm_s"] is None or r["grouped_mm_vs_eager_rel_err"] < 1e-3
    assert (tmp_path / "moe_small_cpu.csv").read_text().startswith("T,")
    if _has_matplotlib():
        assert (tmp_path / "moe_small_cpu.png").stat().st_size > 0
    else:
        assert "no plot, matplotlib is not installed" in out and not (tmp_path / "moe_small_cpu.png").exists()


def test_a_mismatch_fails_the_run(bench, tmp_path, capsys, monkeypatch):
    real = bench.eager_moe
    monkeypatch.setattr(bench, "eager_moe", lambda x, w, spec: real(x, w, spec) * 1.5)
    rc = bench.main(["--small", "--models", "olmoe", "--tokens", "3", "--methods", "moec", "--tag", "bad",
                     "--out", str(tmp_path)])
    assert rc == 1 and "MISMATCH" in capsys.readouterr().out
    assert json.loads((tmp_path / "moe_small_cpu_bad.json").read_text())["rows"][0]["verified"] is False


def test_gpu_plot_has_ms_and_floor_share(bench, tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for model in ("mixtral-8x7b", "olmoe"):
        for T, t_moec in ((1, 40e-6), (16, 60e-6), (4096, 2e-3)):
            r = {"model": model, "T": T, "moec_s": t_moec, "eager_s": 3 * t_moec, "grouped_mm_s": None,
                 "floor_s": 0.5 * t_moec}
            rows.append(r)
    assert bench.floor_pct(rows[0], "moec") == pytest.approx(50.0) and bench.floor_pct(rows[0], "grouped_mm") is None
    png = bench.plot(rows, ["moec", "eager", "grouped_mm"], tmp_path / "gpu.png", "test")
    assert png == tmp_path / "gpu.png" and png.stat().st_size > 0


def test_tune_only_without_a_gpu_tunes_nothing(bench, tmp_path, capsys, monkeypatch):
    import torch
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    monkeypatch.setenv("MOEC_TUNE_FILE", str(tmp_path / "tune.json"))
    assert bench.main(["--tune-only", "--models", "olmoe"]) == 0
    assert "nothing tuned" in capsys.readouterr().out and not (tmp_path / "tune.json").exists()
