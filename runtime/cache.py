"""The kernel cache: rendered source -> content hash -> one directory per key -> imported module.

Key = sha256 of (source, Triton version, mode). Writes are atomic (a temporary directory
renamed into place with ``os.replace``), so two processes compiling the same kernel at once
both end with one complete copy. ``MOEC_CACHE_DIR`` moves the cache (default: the user's
cache dir); ``MOEC_ALWAYS_COMPILE=1`` ignores what is there.

A module is imported twice at most: once under the Triton interpreter (CPU tensors) and once
for real GPUs / ahead-of-time compilation, since ``triton.jit`` decides which at import time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import platformdirs
import triton

_lock = threading.Lock()
_modules: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    env = os.environ.get("MOEC_CACHE_DIR")
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("moec"))


def source_key(source: str) -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(triton.__version__.encode())
    return h.hexdigest()[:32]


def store(source: str, name: str) -> Path:
    """Write ``source`` as ``<cache>/<key>/<name>.py`` (atomically) and return its path."""
    key = source_key(source)
    final = cache_dir() / key
    path = final / f"{name}.py"
    if path.exists() and os.environ.get("MOEC_ALWAYS_COMPILE") != "1":
        return path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        (tmp / f"{name}.py").write_text(source)
        (tmp / "meta.json").write_text(json.dumps({"name": name, "triton": triton.__version__}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race (non-empty target): theirs is identical
            if not path.exists():
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load(source: str, name: str, interpret: bool) -> ModuleType:
    """Import the kernel module for ``source``; ``interpret`` selects the Triton interpreter."""
    key = (source_key(source), interpret)
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        path = store(source, name)
        modname = f"moec_kernels.{'i' if interpret else 'c'}{key[0]}.{name}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            sys.modules[modname] = mod
            spec.loader.exec_module(mod)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _modules[key] = mod
        return mod
