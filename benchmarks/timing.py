"""Host timing shared by the CPU benchmarks (`guards.py`, `host.py`)."""
from __future__ import annotations

import statistics
import time


def per_call_us(fn, batch: int, repeats: int, warmup: int = 1) -> dict:
    """Microseconds per call of ``fn``: the mean over a batch of ``batch`` calls, for ``repeats`` batches
    after ``warmup`` calls; their median, min and max."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        means.append((time.perf_counter() - t0) / batch * 1e6)
    return {"median_us": statistics.median(means), "min_us": min(means), "max_us": max(means)}
