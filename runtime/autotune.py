"""Optional autotuning: time the cost model's best tiles of each kernel on a real GPU, per
token-count bucket, and keep the winners in a JSON file that choose-tiles reads before the model.

    from moec.compiler import compile_spec
    from moec.runtime import autotune
    c = compile_spec(spec, torch.bfloat16, ("y",), arch_of("cuda"))
    autotune.tune(c.program, weights)    # weights: the graph inputs but x; one line per kernel/bucket
    compile_spec.cache_clear()           # done by tune(): later compiles use the winners

For each bucket, `tune` runs the program once at the bucket's representative token count
(`REPRESENTATIVE_T`) to capture every kernel's operands, then for every kernel step times its
current tile and the cost model's next best candidates (``triton.testing.do_bench``, median, when
CUDA is there; any ``timer(fn) -> seconds`` otherwise, which is how the CPU tests drive it). A
candidate whose outputs disagree with the current tile's is dropped. The winner is the fastest,
unless the current tile is within `KEEP_WITHIN` of it (timing noise must not churn configs).

The file: ``MOEC_TUNE_FILE``, else ``tune.json`` in moec's cache directory (``MOEC_CACHE_DIR`` or
the user's cache dir). Entries are keyed by device name (``torch.cuda.get_device_name()``), kernel
shape (the cost model's problem key) and bucket; choose-tiles looks them up for the device this
process compiles for (``MOEC_TUNE_DEVICE`` names another: to compile for a GPU you tuned on from a
machine without it). Format 1::

    {"format": "moec-tune/1",
     "devices": {"NVIDIA H100 80GB HBM3": {
       "arch": "sm90",
       "kernels": {"grouped_gemm E=8 N=14336 K=4096 glu gather=2 bf16->bf16": {
         "T<=16": {"tile": {"type": "GemmTile", "block_m": 16, "block_n": 64, "block_k": 128,
                            "num_warps": 4, "num_stages": 4, "group_m": 8},
                   "us": 41.2, "default_us": 45.1, "T": 16, "candidates": 7, "triton": "3.6.0"}}}}}}

Writes merge with what the file holds and are atomic (a temporary file in the same directory,
then ``os.replace``): a reader never sees half a file, and a file can be built up by several
runs and shipped with a model. Two tuners writing at the same moment: the last one's view wins
for the kernels both tuned.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from . import cache
from .arch import ARCHS, Arch, arch_of
from .tiles import BUCKETS, TILE_TYPES, bucket_key, bucket_ranges, bucket_text

FORMAT = "moec-tune/1"
REPRESENTATIVE_T = {16: 16, 128: 128, 1024: 1024, None: 4096}
KEEP_WITHIN = 0.03          # keep the current tile unless a candidate is more than 3% faster
CHECK_RTOL = 2e-2           # candidates must agree with the current tile (relative L2 error)


# ---- the file -------------------------------------------------------------------------------

def tune_file() -> Path:
    env = os.environ.get("MOEC_TUNE_FILE")
    return Path(env) if env else cache.cache_dir() / "tune.json"


def empty() -> dict:
    return {"format": FORMAT, "devices": {}}


_loaded: dict = {}          # path -> ((mtime_ns, size), data)


def load(path: Optional[Path] = None, fresh: bool = False) -> dict:
    """The file's contents (an empty document if it does not exist); re-read only when it changed
    (every write replaces the file, so its inode changes) or when ``fresh``."""
    path = Path(path or tune_file())
    try:
        st = path.stat()
    except FileNotFoundError:
        return empty()
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _loaded.get(str(path))
    if hit is not None and hit[0] == stamp and not fresh:
        return hit[1]
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a moec tune file of format {FORMAT!r} (got {data.get('format')!r})")
    _loaded[str(path)] = (stamp, data)
    return data


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
    """Merge ``kernels`` ({kernel key: {bucket key: entry}}) into the file under ``device``."""
    path = Path(path or tune_file())
    data = json.loads(json.dumps(load(path, fresh=True)))      # a private copy, read now
    dev = data["devices"].setdefault(device, {"arch": arch, "kernels": {}})
    dev["arch"] = arch
    for key, buckets in kernels.items():
        dev["kernels"].setdefault(key, {}).update(buckets)
    atomic_write_json(path, data)
    return path


def tile_to_json(tile) -> dict:
    return {"type": type(tile).__name__, **tile.as_dict()}


def tile_from_json(d: dict):
    """The tile an entry names, or None if it is malformed (a hand-edited file must not break a compile)."""
    try:
        d = dict(d)
        tile = TILE_TYPES[d.pop("type")](**d)
    except (KeyError, TypeError, AttributeError):
        return None
    dims = [v for k, v in tile.as_dict().items() if k.startswith("block")]
    if any(not isinstance(v, int) or v < 1 or v & (v - 1) for v in dims):
        return None
    return tile


# ---- lookup (choose-tiles) --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Lookup:
    """The tuned entries of one device."""

    device: str
    kernels: dict

    def tile(self, key: str, bound):
        entry = self.kernels.get(key, {}).get(bucket_key(bound))
        return tile_from_json(entry["tile"]) if isinstance(entry, dict) and "tile" in entry else None


def device_name_for(arch: Arch) -> Optional[str]:
    """The device whose entries apply when compiling for ``arch``: ``MOEC_TUNE_DEVICE``, else the
    CUDA device of this process if it is that arch, else None (no tuned entries apply)."""
    env = os.environ.get("MOEC_TUNE_DEVICE")
    if env:
        return env
    if arch.name != "cpu" and torch.cuda.is_available():
        try:
            if arch_of("cuda").name == arch.name:
                return torch.cuda.get_device_name()
        except RuntimeError:
            return None
    return None


def lookup_for(arch: Arch, path: Optional[Path] = None) -> Optional[Lookup]:
    """The tuned entries choose-tiles should use for ``arch`` (None: none apply)."""
    if arch.name == "cpu":
        return None
    device = device_name_for(arch)
    if not device:
        return None
    dev = load(path)["devices"].get(device)
    if not dev or dev.get("arch", arch.name) != arch.name:
        return None
    return Lookup(device, dev.get("kernels", {}))


# ---- tuning -------------------------------------------------------------------------------------

def select(timings: list, current, keep_within: float = KEEP_WITHIN):
    """The winning tile of ``[(tile, seconds)]``: the fastest, unless ``current`` is within
    ``keep_within`` of it. Failed candidates (seconds None) never win."""
    ok = [(t, s) for t, s in timings if s is not None]
    if not ok:
        return current
    best_tile, best = min(ok, key=lambda ts: ts[1])
    mine = next((s for t, s in ok if t == current), None)
    if mine is not None and mine <= best * (1 + keep_within):
        return current
    return best_tile


def do_bench_timer(fn: Callable) -> float:
    """Median seconds of ``fn`` on the GPU (triton.testing.do_bench, CUDA events)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def _poison(tensors: dict) -> None:
    for t in tensors.values():
        if isinstance(t, torch.Tensor):
            t.fill_(float("nan") if t.is_floating_point() else -7)


def _snapshot(step, results: dict, got) -> dict:
    out = dict(results)
    if got:
        out.update(got)
    return {r: t.detach().clone() for r, t in out.items() if isinstance(t, torch.Tensor)}


def _agrees(got: dict, want: dict) -> bool:
    for role, w in want.items():
        g = got.get(role)
        if g is None or g.shape != w.shape:
            return False
        if w.is_floating_point():
            if not torch.equal(torch.isnan(g), torch.isnan(w)):
                return False
            a, b = g[~torch.isnan(g)].double(), w[~torch.isnan(w)].double()
            if a.numel() and (a - b).norm() > CHECK_RTOL * max(b.norm().item(), 1e-30):
                return False
        elif (g != w).float().mean().item() > 0.01:        # a near-tie may route one token differently
            return False
    return True


def _describe(tile) -> str:
    d = tile.as_dict()
    return "x".join(str(v) for k, v in d.items() if k.startswith("block")) + f" w{d['num_warps']} s{d['num_stages']}"


def _inputs_from(program, weights: dict, T: int, gen: torch.Generator) -> dict:
    x_type = dict(program.graph.inputs)["x"]
    like = next(iter(weights.values()))
    x = torch.randn(x_type.concrete(T=T), generator=gen).to(dtype=x_type.torch_dtype, device=like.device)
    return {**weights, "x": x}


def trials(problem, arch: Arch, lo: int, hi, current, candidates: int, orders: int = 2) -> list:
    """The tiles timed against ``current``: the cost model's ``candidates`` best tiles of distinct
    blocks (each in its best-ranked program order), then the ``orders`` best other program orders
    of ``current``'s blocks (the model ranks orders by bytes moved, which a GPU's L2 may not follow)."""
    from moec.passes import cost_model
    ranked = [t for _, t in cost_model.rank(problem, arch, lo, hi)]
    seen, out = {cost_model.without_order(current)}, []
    for tile in ranked:
        if len(out) < candidates and cost_model.without_order(tile) not in seen:
            seen.add(cost_model.without_order(tile))
            out.append(tile)
    same = [t for t in ranked if t != current and cost_model.without_order(t) == cost_model.without_order(current)]
    return out + same[:orders]


def tune(program, weights_or_inputs, *, timer: Optional[Callable] = None, device: Optional[str] = None,
         candidates: int = 6, buckets=BUCKETS, sizes: Optional[dict] = None, path: Optional[Path] = None,
         progress: Optional[Callable] = print, seed: int = 0) -> dict:
    """Tune every kernel step of ``program`` for each bucket and save the winners; returns them as
    ``{kernel key: {bucket key: entry}}`` (what was merged into the file).

    ``weights_or_inputs``: the graph inputs but ``x`` (a random ``x`` is drawn at each bucket's
    token count), or a callable ``T -> inputs``. ``timer(fn) -> seconds`` defaults to do_bench
    on CUDA (required without a GPU). ``device`` names the entries (default: the CUDA device's
    name). ``sizes`` overrides `REPRESENTATIVE_T` (tests use tiny ones). ``candidates``: how many
    of the cost model's ranking to time besides the current tile (see `trials`).
    """
    from moec.passes import cost_model
    arch = ARCHS[program.arch]
    if timer is None:
        if not torch.cuda.is_available():
            raise RuntimeError("autotune times kernels on a GPU: without CUDA pass timer=")
        timer = do_bench_timer
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("without CUDA, name the device the entries are for: device=")
        device = torch.cuda.get_device_name()
    sizes = {**REPRESENTATIVE_T, **(sizes or {})}
    make_inputs = weights_or_inputs if callable(weights_or_inputs) else None
    gen = torch.Generator().manual_seed(seed)
    say = progress or (lambda *_: None)
    results: dict = {}
    ranges = dict(zip(BUCKETS, bucket_ranges(BUCKETS)))
    for bound in buckets:
        lo, hi = ranges[bound]
        T = sizes[bound]
        inputs = make_inputs(T) if make_inputs else _inputs_from(program, weights_or_inputs, T, gen)
        captured = []
        program.run(inputs, on_step=lambda step, ins, outs, ctx: captured.append((step, dict(ins), dict(outs), dict(ctx)))
                    if step.variants else None)
        for step, ins, outs, ctx in captured:
            problem = cost_model.problem_of(step.node, program.graph)
            base = step.variant(T).params
            current = base.tile
            tiles = [current] + trials(problem, arch, lo, hi, current, candidates)
            want, timings = None, []
            saved = {r: t.clone() for r, t in outs.items() if isinstance(t, torch.Tensor)}
            for tile in tiles:
                params = dataclasses.replace(base, tile=tile)

                def fn(params=params):
                    return step.launch(params, ins, outs, ctx)
                try:
                    _poison(outs)
                    got = _snapshot(step, outs, fn())
                    if want is None:
                        want = got
                    elif not _agrees(got, want):
                        say(f"  moec autotune: {step.node.name} {_describe(tile)} disagrees with the current tile; dropped")
                        timings.append((tile, None))
                        continue
                    timings.append((tile, float(timer(fn))))
                except Exception as e:          # a candidate that fails to compile or launch is skipped
                    say(f"  moec autotune: {step.node.name} {_describe(tile)} failed: {type(e).__name__}: {e}")
                    timings.append((tile, None))
            for r, t in saved.items():           # later steps read these as their operands
                outs[r].copy_(t)
            winner = select(timings, current)
            t_win = dict((t, s) for t, s in timings)[winner]
            t_cur = dict((t, s) for t, s in timings).get(current)
            entry = {"tile": tile_to_json(winner), "us": None if t_win is None else round(t_win * 1e6, 3),
                     "default_us": None if t_cur is None else round(t_cur * 1e6, 3), "T": T,
                     "candidates": len(tiles), "triton": _triton_version()}
            results.setdefault(problem.key, {})[bucket_key(bound)] = entry
            gain = f" ({t_cur / t_win:.2f}x the current tile)" if t_cur and t_win and winner != current else ""
            say(f"moec autotune [{device}] %{step.node.name} {problem.key} | {bucket_text(lo, hi)} at T={T} | "
                f"{len(tiles)} tiles | best {_describe(winner)}: "
                f"{'-' if t_win is None else f'{t_win * 1e6:.1f} us'}{gain}")
    saved = save(device, arch.name, results, path)
    say(f"moec autotune: {sum(len(v) for v in results.values())} entries for {device} written to {saved}")
    try:
        from moec.compiler import compile_spec
        compile_spec.cache_clear()           # later compiles consult the new entries
    except ImportError:
        pass
    return results


def _triton_version() -> str:
    import triton
    return triton.__version__
