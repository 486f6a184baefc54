"""moec's environment variables, each read strictly: a value moec does not know is an error that
names the variable and lists what it accepts (a typo must never silently turn a switch off).

| variable | accepts | what it does |
|---|---|---|
| ``MOEC_DISABLE`` | ``1``, ``0`` or unset | ``1``: `moec.compile` returns models unchanged (and says so once) |
| ``MOEC_ALWAYS_COMPILE`` | ``1``, ``0`` or unset | ``1``: rewrite every kernel file instead of reusing the cache |
| ``MOEC_CACHE_DIR`` | a directory | where generated kernels are kept (default: the user's cache dir) |
| ``MOEC_DUMP_DIR`` | a directory | what `moec.compile`'s ``dump_dir`` would receive, for every model |
| ``MOEC_PRINT_AFTER`` | pass names, comma-separated, or ``all`` | print the IR after those passes |
| ``MOEC_TUNE_FILE`` | a file | the autotune file (default: ``tune.json`` in the cache dir) |
| ``MOEC_TUNE_DEVICE`` | a device name | whose tuned entries apply (default: this process's GPU) |
| ``MOEC_ACTIVATIONS`` | ``auto``, ``save``, ``recompute`` | what a training forward keeps for its backward (`moec.compile`'s ``activations`` overrides) |
| ``MOEC_TMA`` | ``1``, ``0`` or unset | grouped GEMMs' weight tiles by TMA: unset on sm90 / sm100 GPUs, ``1`` wherever the layout allows (also the interpreter, for tests), ``0`` never |
| ``MOEC_LOGS`` | a level, or ``+topic`` / ``-topic`` items, comma-separated | what the ``moec`` logger shows (`moec.log`) |
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

_OFF, _ON = ("", "0"), ("1",)


def flag(name: str) -> bool:
    """A switch: ``1`` on, ``0`` or unset off; anything else is an error."""
    value = os.environ.get(name, "").strip()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected 1 (on), 0 or unset (off)")


def switch(name: str) -> Optional[bool]:
    """A switch with a default: ``1`` True, ``0`` False, unset None (the caller's default); else an error."""
    value = os.environ.get(name, "").strip()
    if value == "":
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"environment variable {name}={value!r}: expected 1 (on), 0 (off) or unset (moec decides)")


def path(name: str) -> Optional[Path]:
    """A path, or None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def text(name: str) -> Optional[str]:
    value = os.environ.get(name, "").strip()
    return value or None


def names(name: str, known: Iterable[str], extra: Iterable[str] = ()) -> set[str]:
    """A comma-separated list, each item one of ``known`` (or of ``extra``, e.g. ``all``)."""
    allowed = list(known) + list(extra)
    items = {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}
    unknown = sorted(items - set(allowed))
    if unknown:
        raise ValueError(f"environment variable {name}: unknown {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(allowed)}")
    return items
