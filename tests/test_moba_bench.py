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


def test_densify_state_bytes_counts_every_selection():
    """Every (query, selected block) reads and writes the query's fp32 state, plus one last read."""
    N, H, D, top_k = 4096, 4, 128, 8
    got = bench.densify_state_bytes(N, H, D, top_k)
    assert got == H * N * (D + 2) * 4 * (2 * top_k + 1)
    assert bench.densify_state_bytes(2 * N, H, D, top_k) == 2 * got


@pytest.mark.parametrize("window,block_m", [(16, 16), (32, 8), (64, 16)])
def test_gathered_fill_counts_chunks(window, block_m):
    """Brute force: per (batch, head, window, block up to the row's own) the distinct rows that selected it,
    padded to block_m-row chunks."""
    g = torch.Generator().manual_seed(window + block_m)
    N, bs, K = 70, 8, 4
    idx = torch.randint(-1, 11, (2, 3, N, K), generator=g, dtype=torch.int32)
    useful = padded = 0
    for b in range(2):
        for h in range(3):
            groups = {}
            for t in range(N):
                for j in set(idx[b, h, t].tolist()):
                    if 0 <= j <= t // bs:
                        groups.setdefault((t // window, j), set()).add(t)
            for rows in groups.values():
                useful += len(rows)
                padded += -(-len(rows) // block_m) * block_m
    assert bench.gathered_fill(idx, bs, window, block_m) == pytest.approx(useful / padded)
