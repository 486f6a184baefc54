"""benchmarks/moba.py's arithmetic: the sparse floor counts exactly the keys MoBA attends to."""
import importlib.util
from pathlib import Path

import pytest
import torch

from moec.moba.reference import moba_block_selection

spec = importlib.util.spec_from_file_location("moba_bench", Path(__file__).parent.parent / "benchmarks" / "moba.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("N,bs,top_k", [(1, 4, 2), (37, 4, 3), (64, 8, 1), (50, 16, 9)])
def test_attended_keys_counts_the_selection(N, bs, top_k):
    q = torch.randn(1, 1, N, 4)
    idx = moba_block_selection(q, q, block_size=bs, top_k=top_k)[0, 0]
    s = torch.arange(N)
    keys = sum(int((torch.isin(s // bs, idx[i][idx[i] >= 0]) & (s <= i)).sum()) for i in range(N))
    assert bench.attended_keys(N, bs, top_k) == keys


def test_floor_is_the_larger_bound():
    f = bench.floor(8192, 16, 16, 128, 128, 8)
    assert f["floor_ms"] == max(f["compute_ms"], f["memory_ms"]) and f["bound"] in ("compute", "memory")


def test_densify_extra_bytes_counts_the_partials():
    """At least every (query, slot) partial written and read once (bf16 out + fp32 lse)."""
    N, H, D, bs, top_k = 4096, 4, 128, 128, 8
    extra = bench.densify_extra_bytes(N, H, H, D, bs, top_k)
    assert extra >= 2 * H * N * top_k * (D * 2 + 4)
    assert bench.densify_extra_bytes(2 * N, H, H, D, bs, top_k) == 2 * extra
