"""The training benchmarks on the CPU: ``benchmarks/moe_train.py --small`` (every method's gradients agree
with eager's; the training floor counts three times the forward's FLOPs) and ``benchmarks/moba_train.py
--small`` (moec's MoBA gradients agree with the eager reference's)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("moec_bench_moe_train", BENCHMARKS / "moe_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_small_run_checks_every_method(bench, tmp_path, capsys):
    import torch
    rows = bench.measure("deepseek-v3", (9,), torch.device("cpu"), torch.float32, True,
                         ("moec", "eager", "grouped_mm"), log=lambda *a: None)
    for row in rows:
        assert row["moec_status"] == "ok" and row["moec_grad_rel_err"] < 1e-4, row
        assert row["grouped_mm_status"] in ("ok", "unavailable"), row
    assert bench.main(["--small", "--models", "mixtral", "--tokens", "3", "--methods", "moec", "eager",
                       "--out", str(tmp_path)]) == 0
    assert "GPU timings were NOT measured" in capsys.readouterr().out
    assert (tmp_path / "moe_train_small_cpu.json").exists()


def test_training_floor_is_three_forwards(bench):
    from moe import floor_terms
    from moe_layers import MODELS
    spec = MODELS["mixtral-8x7b"].spec
    assert bench.train_floor(spec, 4096, 8, 2)[0] == 3 * floor_terms(spec, 4096, 8, 2)[0]


def test_moba_train_small_checks_gradients(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("moec_bench_moba_train", BENCHMARKS / "moba_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    module.main(["--small"])
    out = capsys.readouterr().out
    assert "gradients max |moec - eager|" in out and "GPU timing was not measured" in out
    assert module.train_floor_ms(8192, 16, 16, 128, 128, 8) > 0
