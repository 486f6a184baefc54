"""The edges a user touches: the kernel cache and its files, the tune file, dump paths, environment
variables and what explain() counts. Each case was once a crash, a silent misreading or code run
from a file nobody wrote."""
from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import moec
from moec import autotune
from moec.compiler import compile_spec
from moec.runtime import cache
from moec.runtime.arch import ARCHS
from moec.runtime.launch import Kernel
from moec.spec import MoESpec, RouterConfig
from zoo import MixtralMoE

SRC = '''import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
'''
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache of this test's own, and no module imported from another."""
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_modules", {})
    monkeypatch.setattr(cache, "_fallback", {})
    return tmp_path / "cache"


def run_kernel(source=SRC):
    x = torch.zeros(8)
    Kernel(source, "add_one")((1,), {"x_ptr": x, "n": 8}, {"BLOCK": 8})
    return x


# ---- the kernel cache ---------------------------------------------------------------------------

def test_cached_file_with_appended_code_is_rewritten_not_run(fresh_cache, monkeypatch):
    path = cache.store(SRC, "add_one")
    marker = fresh_cache.parent / "ran"
    path.write_text(SRC + f"\nopen({str(marker)!r}, 'w').write('planted')\n")
    monkeypatch.setattr(cache, "_modules", {})                    # a new process
    assert torch.equal(run_kernel(), torch.ones(8))
    assert not marker.exists() and path.read_text() == SRC


def test_truncated_entry_is_rewritten(fresh_cache, monkeypatch):
    path = cache.store(SRC, "add_one")
    path.write_text(SRC[:40])
    monkeypatch.setattr(cache, "_modules", {})
    assert torch.equal(run_kernel(), torch.ones(8)) and path.read_text() == SRC


def test_always_compile_rewrites(fresh_cache, monkeypatch):
    path = cache.store(SRC, "add_one")
    before = path.stat().st_ino
    monkeypatch.setenv("MOEC_ALWAYS_COMPILE", "1")
    assert cache.store(SRC, "add_one").stat().st_ino != before and path.read_text() == SRC
    monkeypatch.setenv("MOEC_ALWAYS_COMPILE", "yes")
    with pytest.raises(ValueError, match=r"MOEC_ALWAYS_COMPILE='yes': expected 1 \(on\), 0 or unset"):
        cache.store(SRC, "add_one")


def test_cache_directories_are_private(fresh_cache):
    path = cache.store(SRC, "add_one")
    for d in (fresh_cache, path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


@pytest.mark.parametrize("kind", ["a regular file", "under a regular file", "unwritable", "world-writable"])
def test_unusable_cache_root_falls_back_with_one_warning(kind, tmp_path, monkeypatch):
    root = tmp_path / "root"
    if kind == "a regular file":
        root.write_text("not a directory")
        why = "not a directory"
    elif kind == "under a regular file":
        (tmp_path / "file").write_text("")
        root = tmp_path / "file" / "cache"
        why = "cannot be created"
    elif kind == "unwritable":
        if os.getuid() == 0:
            pytest.skip("root writes anywhere")
        root.mkdir(mode=0o500)
        why = "not writable"
    else:
        root.mkdir()
        root.chmod(0o777)
        why = "writable by every user"
    monkeypatch.setenv("MOEC_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_modules", {})
    monkeypatch.setattr(cache, "_fallback", {})
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert torch.equal(run_kernel(), torch.ones(8))
        cache.store(SRC + "# another\n", "add_one")
    said = [w for w in got if issubclass(w.category, cache.CacheWarning)]
    assert len(said) == 1 and why in str(said[0].message) and str(root) in str(said[0].message)
    assert not cache.cache_dir().is_relative_to(root)


# ---- the tune file ------------------------------------------------------------------------------

SPEC = MoESpec(32, 64, RouterConfig(8, 2, renormalize=True))
MALFORMED = {
    "devices is a list": {"format": "moec-tune/2", "devices": []},
    "devices is a string": {"format": "moec-tune/2", "devices": "GPU"},
    "kernels is a list": {"format": "moec-tune/2", "devices": {"Fake GPU": {"arch": "sm90", "kernels": []}}},
    "a device is a number": {"format": "moec-tune/2", "devices": {"Fake GPU": 3}},
    "an entry of strings": {"format": "moec-tune/2", "devices": {"Fake GPU": {"arch": "sm90", "kernels": {
        "*": {"T<=16": {"tile": {"type": "GemmTile", "block_m": "16", "block_n": 16, "block_k": 16}}}}}}},
}


@pytest.mark.parametrize("case", list(MALFORMED) + ["nested 100k deep", "not text"])
def test_malformed_tune_file_is_a_warning_never_a_crash(case, tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    if case == "nested 100k deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "not text":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        doc = copy.deepcopy(MALFORMED[case])
        if case == "an entry of strings":
            key = next(iter(_kernel_keys()))
            doc["devices"]["Fake GPU"]["kernels"] = {key: doc["devices"]["Fake GPU"]["kernels"]["*"]}
        path.write_text(json.dumps(doc))
    monkeypatch.setenv("MOEC_TUNE_FILE", str(path))
    monkeypatch.setenv("MOEC_TUNE_DEVICE", "Fake GPU")
    autotune.invalidate()
    with pytest.warns(autotune.TuneWarning):
        c = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    assert all(b["source"] == "cost model" for k in c.tiles().values() for b in k["buckets"].values())
    autotune.invalidate()


def _kernel_keys():
    c = compile_spec(SPEC, torch.float16, ("y",), ARCHS["sm90"])
    return [autotune.kernel_key(s.node, c.graph) for s in c.kernel_steps()]


# ---- dumps, environment variables, explain --------------------------------------------------------

class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleDict({"/tmp/x": MixtralMoE(16, 32, 4, 2), "/a/b/c": MixtralMoE(16, 32, 4, 2)})

    def forward(self, x):
        return self.layers["/tmp/x"](x) + self.layers["/a/b/c"](x)


def test_module_names_cannot_write_outside_the_dump(tmp_path):
    torch.manual_seed(0)
    dump = tmp_path / "dump" / "inner"
    model = moec.compile(Holder(), dump_dir=dump)
    with torch.no_grad():
        model(torch.randn(3, 16))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(dump) for p in written), written
    assert {p.name for p in dump.iterdir()} >= {"explain.txt"}


def test_print_after_names_are_checked(monkeypatch):
    monkeypatch.setenv("MOEC_PRINT_AFTER", "fold-combine,fuse-actvation")
    autotune.invalidate()
    with pytest.raises(Exception, match="unknown 'fuse-actvation'; accepted: verify, infer-shapes"):
        compile_spec(SPEC, torch.float32, ("y",), ARCHS["cpu"])
    autotune.invalidate()


def test_explain_counts_a_failed_call_as_failed(monkeypatch):
    torch.manual_seed(0)
    model = moec.compile(MixtralMoE(16, 32, 4, 2))
    region = model.__dict__["_moec_region"]

    def broken(*args):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(region, "kernels", broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match="launch failed"):
        model(torch.randn(2, 16))
    assert region.calls == {"failed (kernels): RuntimeError": 1}
    assert "calls: 1 x failed (kernels): RuntimeError" in model.explain() and "x kernels" not in model.explain()


# ---- the off switch, the log, explain's wording -----------------------------------------------------

def test_moec_disable_returns_models_unchanged_and_says_so_once():
    code = """
        import warnings, torch, moec
        from zoo import MixtralMoE
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            m = MixtralMoE(16, 32, 4, 2)
            cls = type(m)
            assert moec.compile(m) is m and type(m) is cls and not hasattr(m, "explain")
            moec.compile(MixtralMoE(16, 32, 4, 2))
            assert moec.compile(MixtralMoE) is MixtralMoE
        said = [w for w in got if "MOEC_DISABLE" in str(w.message)]
        assert len(said) == 1, [str(w.message) for w in got]
        print("ok")
    """
    got = _run(code, MOEC_DISABLE="1")
    assert got.returncode == 0 and got.stdout.strip().endswith("ok"), got.stderr[-2000:]


def test_logs_say_what_was_lifted_compiled_and_tiled():
    code = """
        import torch, moec
        from zoo import MixtralMoE, TanhExpertMoE
        m = moec.compile(torch.nn.Sequential(MixtralMoE(16, 32, 4, 2), TanhExpertMoE(16, 32, 4, 2)))
        with torch.no_grad():
            m[0](torch.randn(1, 3, 16))
    """
    got = _run(code, MOEC_LOGS="+lift,+compile,+tiles,+calls")
    assert got.returncode == 0, got.stderr[-2000:]
    err = got.stderr
    assert "[moec.lift] 0 (MixtralMoE): lifted" in err and "[moec.lift] 1 (TanhExpertMoE): stays eager" in err
    assert "[moec.compile] MoE layer (4 experts, top-2, d=16, f=32) for float32 on cpu" in err
    assert "[moec.tiles] h grouped_gemm, every T: grouped_gemm_gather_silu_glu" in err
    assert "[moec.calls] 0: first call served by kernels" in err
    quiet = _run(code)
    assert quiet.returncode == 0 and "[moec." not in quiet.stderr
    bad = _run(code, MOEC_LOGS="+lifts")
    assert bad.returncode != 0 and "MOEC_LOGS: unknown '+lifts'; accepted: a level" in bad.stderr


def _run(code: str, **env_vars) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEC_")}
    env.update(env_vars, PYTHONPATH=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=env)


class Stack(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(MixtralMoE(16, 32, 4, 2) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_explain_groups_identical_layers_in_plain_words():
    torch.manual_seed(0)
    model = moec.compile(Stack(3))
    with torch.no_grad():
        model(torch.randn(1, 4, 16))
    text = model.explain()
    assert text.count("LIFTED") == 1 and "LIFTED  layers.0-2 (MixtralMoE)" in text and "[3 modules, one report]" in text
    assert "grouped_gemm: grouped_gemm_gather_silu_glu, tile 16x32x16, 4 warps, 1 stage" in text
    for jargon in (" w4 ", " s1", "TraceError", "fx trace stopped", "candidate", "of the search"):
        assert jargon not in text, jargon
    assert text.count("everything else runs as eager PyTorch") == 1
    with moec.disabled():
        model.layers[1](torch.randn(1, 4, 16))            # one layer's calls now differ: its own entry
    assert model.explain().count("LIFTED") == 3

    @moec.compile
    def two(a, b, x):
        return a(x) + b(x)

    with torch.no_grad():
        two(Stack(2), Stack(1), torch.randn(1, 4, 16))
    text = two.explain()
    assert text.count("everything else runs as eager PyTorch") == 1 and text.count("  module Stack:") == 2
