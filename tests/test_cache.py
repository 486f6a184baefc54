"""The kernel cache: content-addressed, atomic under concurrent writers, interpreter on CPU."""
import multiprocessing as mp
import os
from pathlib import Path

import torch

from moec.runtime import cache
from moec.runtime.launch import Kernel, recording

SRC = '''import triton
import triton.language as tl


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)
'''


def _store(args):
    d, i = args
    os.environ["MOEC_CACHE_DIR"] = d
    return str(cache.store(SRC + f"# same source\n", "scale_kernel"))


def test_concurrent_writers_leave_one_complete_entry(tmp_path):
    with mp.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_store, [(str(tmp_path), i) for i in range(4)])
    assert len(set(paths)) == 1
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    assert (entries[0] / "scale_kernel.py").read_text().startswith("import triton")
    assert (entries[0] / "meta.json").exists()


def test_kernel_runs_interpreted_and_records(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path))
    k = Kernel(SRC, "scale_kernel")
    x = torch.randn(100)
    y = torch.empty_like(x)
    with recording() as recs:
        k((2,), {"x_ptr": x, "y_ptr": y, "n": 100, "factor": 3.0}, {"BLOCK": 64})
    torch.testing.assert_close(y, x * 3)
    assert recs[0].grid == (2,) and recs[0].signature["x_ptr"] == "*fp32" and recs[0].constexprs == {"BLOCK": 64}
    assert cache.source_key(SRC) != cache.source_key(SRC + "\n")


def test_cache_dir_without_platformdirs(monkeypatch, tmp_path):
    """A bare machine installed with --no-deps has no platformdirs: the cache goes to XDG_CACHE_HOME/moec
    (or ~/.cache/moec)."""
    import sys
    from moec.runtime import cache
    monkeypatch.setitem(sys.modules, "platformdirs", None)          # import platformdirs raises ImportError
    monkeypatch.delenv("MOEC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.configured_dir() == tmp_path / "moec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.configured_dir() == Path.home() / ".cache" / "moec"
