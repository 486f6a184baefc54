"""The autotune file: where it is, its format, atomic merged writes, and the
lookup choose-tiles makes before the cost model. `moec.autotune` writes it.

The file: ``MOEC_TUNE_FILE``, else ``tune.json`` in moec's cache directory (``MOEC_CACHE_DIR`` or
the user's cache dir). Entries are keyed by device name (``torch.cuda.get_device_name()``), kernel
(`moec.passes.choose_tiles.kernel_key`: the cost model's problem key, which names the rows per token ``M=kT``, N, K, dtypes
and the fused prologue/epilogue, plus the node attributes that change the generated code, e.g.
the routing's score function and expert groups) and bucket; choose-tiles looks them up for the
device this process compiles for (``MOEC_TUNE_DEVICE`` names another: to compile for a GPU you
tuned on from a machine without it). Format 2::

    {"format": "moec-tune/2",
     "devices": {"NVIDIA H100 80GB HBM3": {
       "arch": "sm90",
       "kernels": {"grouped_gemm E=8 M=2T N=14336 K=4096 glu gather=2 bf16->bf16 act_alpha=1 activation=silu up_shift=0": {
         "T<=16": {"tile": {"type": "GemmTile", "block_m": 16, "block_n": 64, "block_k": 128,
                            "num_warps": 4, "num_stages": 4, "group_m": 8},
                   "us": 41.2, "default_us": 45.1, "T": [1, 16], "candidates": 7, "triton": "3.6.0"}}}}}}

Format 1 keys were ambiguous (the down projection's omitted top-k, the router's its score
function and groups): a format-1 file is ignored with a `TuneWarning` at compile time, and
`tune` refuses to merge into one (move it away and re-tune).

Writes merge with what the file holds and are atomic (a temporary file in the same directory,
then ``os.replace``): a reader never sees half a file, and a file can be built up by several
runs and shipped with a model. Two tuners writing at the same moment: the last one's view wins
for the kernels both tuned. Every write in this process calls `invalidate`, so programs and
modules compiled before it pick up the new tiles at their next compile or call.
"""
from __future__ import annotations

import dataclasses
import json
import os
import reprlib
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import cache
from .arch import Arch, arch_of
from moec import env
from moec.ir.tiles import TILE_TYPES, bucket_key

FORMAT = "moec-tune/2"


class TuneWarning(UserWarning):
    """A tune file, or an entry of it, that applies here but is not used (and why)."""


# ---- the file -------------------------------------------------------------------------------

def tune_file() -> Path:
    return env.path("MOEC_TUNE_FILE") or cache.cache_dir() / "tune.json"


def empty() -> dict:
    return {"format": FORMAT, "devices": {}}


_loaded: dict = {}          # path -> ((mtime_ns, size), data)


def load(path: Optional[Path] = None, fresh: bool = False) -> dict:
    """The file's contents (an empty document if it does not exist); re-read only when it changed
    (every write replaces the file, so its inode changes) or when ``fresh``. A file of another
    format, not JSON, or not shaped as the format says (`check`) raises ValueError."""
    path = Path(path or tune_file())
    try:
        st = path.stat()
    except FileNotFoundError:
        return empty()
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _loaded.get(str(path))
    if hit is not None and hit[0] == stamp and not fresh:
        return hit[1]
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a moec tune file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not text: {e}") from None
    check(data, path)
    _loaded[str(path)] = (stamp, data)
    return data


def check(data, path) -> None:
    """ValueError unless ``data`` is a tune document: ``{"format": FORMAT, "devices": {name: {"arch": str,
    "kernels": {key: {bucket: entry}}}}}`` (entries themselves are checked when used, one by one)."""
    got = data.get("format") if isinstance(data, dict) else None
    if got != FORMAT:
        old = " (written by an older moec, whose kernel keys are ambiguous: re-tune)" if got == "moec-tune/1" else ""
        raise ValueError(f"{path}: not a moec tune file of format {FORMAT!r} (got {got!r}){old}")
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise ValueError(f"{path}: 'devices' must be an object of devices, got {type(devices).__name__}")
    for name, dev in devices.items():
        if not isinstance(dev, dict) or not isinstance(dev.get("kernels", {}), dict) \
                or not isinstance(dev.get("arch", ""), str):
            raise ValueError(f"{path}: device {name!r} must be an object with 'arch' (a string) and 'kernels' "
                             f"(an object of kernels)")


def atomic_write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save(device: str, arch: str, kernels: dict, path: Optional[Path] = None) -> Path:
    """Merge ``kernels`` ({kernel key: {bucket key: entry}}) into the file under ``device``, then
    `invalidate` (compiles and compiled modules of this process take the new entries)."""
    path = Path(path or tune_file())
    data = json.loads(json.dumps(load(path, fresh=True)))      # a private copy, read now
    dev = data["devices"].setdefault(device, {"arch": arch, "kernels": {}})
    dev["arch"] = arch
    for key, buckets in kernels.items():
        dev["kernels"].setdefault(key, {}).update(buckets)
    atomic_write_json(path, data)
    invalidate()
    return path


_generation = 0


def generation() -> int:
    """Bumped by `invalidate`: a compiled program records the generation it was compiled in, and
    a compiled module (`moec.region.Region`) recompiles at its next call when it is stale."""
    return _generation


def invalidate() -> None:
    """Make the tune file's current contents apply in this process: bump `generation`, which every
    compiled program is memoised under (`moec.compiler`), so compiles after it read the file again
    and modules compiled before recompile (once) at their next call with the new tiles instead of
    silently keeping the old ones. `save` (so `moec.autotune.tune`) calls it; call it yourself after
    replacing the file, or changing ``MOEC_TUNE_FILE``/``MOEC_TUNE_DEVICE``, in a running process
    (another process's writes are not watched)."""
    global _generation
    _generation += 1


def tile_to_json(tile) -> dict:
    return {"type": type(tile).__name__, **tile.as_dict()}


def tile_from_json(d: dict):
    """The tile an entry names, or None if it is malformed (a hand-edited file must not break a compile)."""
    try:
        d = dict(d)
        tile = TILE_TYPES[d.pop("type")](**d)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    for k, v in tile.as_dict().items():
        if not isinstance(v, int) or isinstance(v, bool) or not (k != "persistent") <= v <= 1 << 16 \
                or k.startswith("block") and v & (v - 1):
            return None
    return tile


# ---- lookup (choose-tiles) --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Lookup:
    """The tuned entries of one device (read from ``path``)."""

    device: str
    kernels: dict
    path: str = ""

    def entry(self, key: str, bound):
        """``(tile, None)`` for a usable entry, ``(None, None)`` when there is none, ``(None, why)``
        when the entry is malformed (choose-tiles reports it and uses the cost model)."""
        per_bucket = self.kernels.get(key)
        entry = per_bucket.get(bucket_key(bound)) if isinstance(per_bucket, dict) else per_bucket
        if entry is None:
            return None, None
        tile = tile_from_json(entry.get("tile")) if isinstance(entry, dict) else None
        return (tile, None) if tile is not None else (None, f"malformed entry {reprlib.repr(entry)}")

    def tile(self, key: str, bound):
        return self.entry(key, bound)[0]


def device_name_for(arch: Arch) -> Optional[str]:
    """The device whose entries apply when compiling for ``arch``: ``MOEC_TUNE_DEVICE``, else the
    CUDA device of this process if it is that arch, else None (no tuned entries apply)."""
    named = env.text("MOEC_TUNE_DEVICE")
    if named:
        return named
    if arch.name != "cpu" and torch.cuda.is_available():
        try:
            if arch_of("cuda").name == arch.name:
                return torch.cuda.get_device_name()
        except RuntimeError:
            return None
    return None


def lookup_for(arch: Arch, path: Optional[Path] = None) -> Optional[Lookup]:
    """The tuned entries choose-tiles should use for ``arch`` (None: none apply). A file that cannot
    be read as this format is ignored with a `TuneWarning`: a stale cache must not break compiles."""
    if arch.name == "cpu":
        return None
    device = device_name_for(arch)
    if not device:
        return None
    path = Path(path or tune_file())
    try:
        dev = load(path)["devices"].get(device)
    except (ValueError, OSError) as e:
        warnings.warn(f"moec: tune file ignored, tiles come from the cost model: {e}", TuneWarning, stacklevel=2)
        return None
    if not dev or dev.get("arch", arch.name) != arch.name:
        return None
    return Lookup(device, dev.get("kernels", {}), str(path))
