"""The kernel cache: rendered source -> content hash -> one directory per key -> imported module.

Key = sha256 of (source, Triton version). Writes are atomic (a temporary directory renamed into
place with ``os.replace``), so two processes compiling the same kernel at once both end with one
complete copy. ``MOEC_CACHE_DIR`` moves the cache (default: the user's cache dir);
``MOEC_ALWAYS_COMPILE=1`` rewrites every file instead of reusing it.

A cached file is trusted only if it is the source in hand: before a module is imported its file is
compared with the rendered source (free: the source is in memory), and a file that differs (edited,
truncated, written by something else) is replaced. Directories are created private (0700); a cache
root that is world-writable or owned by another user is not used, and neither is one that cannot be
written (a regular file, no permission): then a private temporary cache serves the process, with one
warning that says why. A model call never fails for the cache's sake.

A module is imported twice at most: once under the Triton interpreter (CPU tensors) and once
for real GPUs / ahead-of-time compilation, since ``triton.jit`` decides which at import time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import triton

from moec import env
from moec.log import logger

_lock = threading.Lock()                # imports
_fallback_lock = threading.Lock()       # choosing the private temporary cache (taken inside `_lock`)
_modules: dict[tuple[str, bool], ModuleType] = {}
_fallback: dict[str, Path] = {}        # configured root -> the private temporary cache used instead


_log = logger("cache")


class CacheWarning(UserWarning):
    """The configured kernel cache cannot be used; a private temporary one serves instead."""


def configured_dir() -> Path:
    return env.path("MOEC_CACHE_DIR") or user_cache_dir()


def user_cache_dir() -> Path:
    """The user's cache directory for moec: platformdirs' where it is installed, else (a bare machine
    installed with ``--no-deps``) ``$XDG_CACHE_HOME/moec`` or ``~/.cache/moec``."""
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME", "").strip()
        return (Path(base) if base else Path.home() / ".cache") / "moec"
    return Path(platformdirs.user_cache_dir("moec"))


def _unusable(root: Path) -> Optional[str]:
    """Why ``root`` cannot hold kernels (None: it can; it is created, private, if missing)."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        return "it is not a directory"
    except OSError as e:
        return f"it cannot be created ({e.strerror or e})"
    st = root.stat()
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it is owned by another user (uid {st.st_uid})"
    if st.st_mode & stat.S_IWOTH:             # anyone could plant a kernel under a key we will import
        return "it is writable by every user"
    if not os.access(root, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


def cache_dir() -> Path:
    """The directory kernels are kept in: the configured one when it is usable, else (with one
    warning naming the reason) a private temporary directory for this process."""
    root = configured_dir()
    fallback = _fallback.get(str(root))
    if fallback is not None:
        return fallback
    why = _unusable(root)
    if why is None:
        return root
    with _fallback_lock:
        if str(root) not in _fallback:
            _fallback[str(root)] = Path(tempfile.mkdtemp(prefix="moec-cache-"))
            warnings.warn(f"moec: kernel cache {root} is not used: {why}; kernels are cached in "
                          f"{_fallback[str(root)]} for this process (set MOEC_CACHE_DIR to a private directory)",
                          CacheWarning, stacklevel=3)
    return _fallback[str(root)]


def source_key(source: str) -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(triton.__version__.encode())
    return h.hexdigest()[:32]


def _holds(path: Path, source: str) -> bool:
    try:
        return path.read_text() == source
    except (OSError, UnicodeDecodeError):
        return False


def store(source: str, name: str) -> Path:
    """``<cache>/<key>/<name>.py`` holding exactly ``source`` (written atomically when it does not)."""
    key = source_key(source)
    root = cache_dir()
    final = root / key
    path = final / f"{name}.py"
    if not env.flag("MOEC_ALWAYS_COMPILE") and _holds(path, source):
        _log.debug("hit %s", path)
        return path
    _log.debug("%s %s", "rewrite" if path.exists() else "write", path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))          # private (0700)
    try:
        (tmp / f"{name}.py").write_text(source)
        (tmp / "meta.json").write_text(json.dumps({"name": name, "triton": triton.__version__}))
        try:
            os.replace(tmp, final)
        except OSError:      # a directory is there: another writer's (identical), or a stale or edited one
            if not _holds(path, source) or env.flag("MOEC_ALWAYS_COMPILE"):
                old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=root))
                try:
                    os.replace(final, old / "entry")
                except OSError:
                    pass     # a concurrent writer moved it first
                shutil.rmtree(old, ignore_errors=True)
                try:
                    os.replace(tmp, final)
                except OSError:
                    pass     # a concurrent writer won the race with the same source
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _holds(path, source):
        raise RuntimeError(f"moec: the kernel cache entry {final} could not be written")
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
