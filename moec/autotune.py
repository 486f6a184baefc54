"""Optional autotuning: time the cost model's best tiles of each kernel on a real GPU, per
token-count bucket, and keep the winners in a JSON file that choose-tiles reads before the model.

    model = moec.compile(model)
    moec.tune(model, example_input)      # every lifted MoE layer; progress lines as it goes
    model(x)                             # the layers recompile once, with the tuned tiles

or, for one program: ``moec.autotune.tune(compile_spec(spec, ...).program, weights)``.

For each bucket, `tune` runs the program once at each of the bucket's representative token counts
(`REPRESENTATIVE_T`) to capture every kernel's operands, then for every kernel step times its
current tile and the cost model's next best candidates (``triton.testing.do_bench``, median, when
CUDA is there; any ``timer(fn) -> seconds`` otherwise, which is how the CPU tests drive it). A
tile's time is the mean over those token counts: the decode bucket (T <= 16) is timed at T = 1
and T = 16, since the two ends of it differ (one row per expert vs a few) and a tile that only
wins at 16 must not slow single-token decode; the kernel is the same at both, so the second
count costs only its timing. A candidate whose outputs disagree with the current tile's is
dropped. The winner is the fastest, unless the current tile is within `KEEP_WITHIN` of it
(timing noise must not churn configs). Progress is one line per timed candidate (kernel i/n,
bucket, candidate j/m, elapsed) and one per kernel and bucket with the winner.

The file the winners go to and the lookup the compile driver hands to choose-tiles:
`moec.runtime.tune_file` (its names are re-exported here); the kernel keys:
`moec.passes.choose_tiles.kernel_key`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import triton
import triton.testing

from moec.ir.build import moe_inputs
from moec.ir.tiles import BUCKETS, bucket_key, bucket_ranges, bucket_text
from moec.passes import cost_model
from moec.passes.choose_tiles import kernel_key
from moec.runtime.arch import Arch, facts
from moec.runtime.tune_file import (FORMAT, Lookup, TuneWarning, atomic_write_json, device_name_for,  # noqa: F401
                                    empty, generation, invalidate, json, load, lookup_for, save, tile_from_json,
                                    tile_to_json, tune_file)

from .moe_region import MoERegion

REPRESENTATIVE_T = {16: (1, 16), 128: (128,), 1024: (1024,), None: (4096,)}
KEEP_WITHIN = 0.03          # keep the current tile unless a candidate is more than 3% faster
CHECK_RTOL = 2e-2           # candidates must agree with the current tile (relative L2 error)


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
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def _poison(tensors: dict) -> None:
    for t in tensors.values():
        if isinstance(t, torch.Tensor):
            t.fill_(float("nan") if t.is_floating_point() else -7)


def _snapshot(results: dict, got) -> dict:
    out = dict(results)
    if got:
        out.update(got)
    return {r: t.detach().clone() for r, t in out.items() if isinstance(t, torch.Tensor)}


def _agrees(got: dict, want: dict) -> bool:
    for role, w in want.items():
        g = got.get(role)
        if g is None or g.shape != w.shape:
            return False
        if role == "schedule":       # a tile schedule: entries past its tile count are undefined
            if not torch.equal(_schedule_entries(g), _schedule_entries(w)):
                return False
            continue
        if w.is_floating_point():
            if not torch.equal(torch.isnan(g), torch.isnan(w)):
                return False
            a, b = g[~torch.isnan(g)].double(), w[~torch.isnan(w)].double()
            if a.numel() and (a - b).norm() > CHECK_RTOL * max(b.norm().item(), 1e-30):
                return False
        elif (g != w).float().mean().item() > 0.01:        # a near-tie may route one token differently
            return False
    return True


def _schedule_entries(s: torch.Tensor) -> torch.Tensor:
    """A tile schedule's defined entries (`moec.runtime.schedule_kernel`): its count and each tile's three numbers."""
    n, M = int(s[0]), (s.shape[0] - 1) // 3
    return torch.cat([s[:1], *(s[1 + part * M:1 + part * M + n] for part in range(3))])


def _describe(tile) -> str:
    d = tile.as_dict()
    order = f" g{d['group_m']}" if "group_m" in d else ""
    persistent = f" p{d['persistent']}" if d.get("persistent") else ""
    return ("x".join(str(v) for k, v in d.items() if k.startswith("block"))
            + f" w{d['num_warps']} s{d['num_stages']}{order}{persistent}")


def _inputs_from(program, weights: dict, T: int, gen: torch.Generator) -> dict:
    x_type = dict(program.graph.inputs)["x"]
    like = next(iter(weights.values()))
    x = torch.randn(x_type.concrete(T=T), generator=gen).to(dtype=x_type.torch_dtype, device=like.device)
    return {**weights, "x": x}


def trials(problem, arch: Arch, lo: int, hi, current, candidates: int, orders: int = 2) -> list:
    """The tiles timed against ``current``: the cost model's ``candidates`` best tiles of distinct
    blocks (each in its best-ranked program order), then the ``orders`` best other program orders
    of ``current``'s blocks (the model ranks orders by bytes moved, which a GPU's L2 may not follow)."""
    ranked = [t for _, t in cost_model.rank(problem, arch, lo, hi)]
    seen, out = {cost_model.without_order(current)}, []
    for tile in ranked:
        if len(out) < candidates and cost_model.without_order(tile) not in seen:
            seen.add(cost_model.without_order(tile))
            out.append(tile)
    same = [t for t in ranked if t != current and cost_model.without_order(t) == cost_model.without_order(current)]
    return out + same[:orders]


def _sizes_of(bound, lo: int, hi, sizes: dict) -> tuple:
    """The token counts a bucket is timed at (``sizes[bound]``: an int or a tuple), all in the bucket."""
    got = sizes[bound]
    Ts = (got,) if isinstance(got, int) else tuple(got)
    if not Ts or any(T < lo or (hi is not None and T > hi) for T in Ts):
        raise ValueError(f"autotune sizes for bucket {bucket_text(lo, hi)}: {Ts} must lie in the bucket")
    return Ts


def _capture(program, inputs: dict) -> list:
    """Run ``program`` once; ``[(step, operands, results, ctx)]`` of each kernel step, in order."""
    out = []
    program.run(inputs, on_step=lambda step, ins, outs, ctx: out.append((step, dict(ins), dict(outs), dict(ctx)))
                if step.variants else None)
    return out


def _time(step, params, runs: list, wants: list, timer: Callable):
    """Mean seconds of ``params`` over the captured ``runs`` (one per token count), after checking
    its outputs against ``wants`` (filled in by the first tile, the current one); ``(None, why)``
    when it disagrees or fails."""
    total = 0.0
    for i, (_, ins, outs, ctx) in enumerate(runs):
        def fn(ins=ins, outs=outs, ctx=ctx):
            return step.launch(params, ins, outs, ctx)
        try:
            _poison(outs)
            got = _snapshot(outs, fn())
            if wants[i] is None:
                wants[i] = got
            elif not _agrees(got, wants[i]):
                return None, f"disagrees with the current tile at T={ctx['T']}; dropped"
            total += float(timer(fn))
        except Exception as e:          # a candidate that fails to compile or launch is skipped
            return None, f"failed: {type(e).__name__}: {str(e)[:200]}"
    return total / len(runs), None


def tune(program, weights_or_inputs, *, timer: Optional[Callable] = None, device: Optional[str] = None,
         candidates: int = 6, buckets=BUCKETS, sizes: Optional[dict] = None, path: Optional[Path] = None,
         progress: Optional[Callable] = print, seed: int = 0) -> dict:
    """Tune every kernel step of ``program`` for each bucket and save the winners; returns them as
    ``{kernel key: {bucket key: entry}}`` (what was merged into the file).

    ``weights_or_inputs``: the graph inputs but ``x`` (a random ``x`` is drawn at each token
    count), or a callable ``T -> inputs``. ``timer(fn) -> seconds`` defaults to do_bench on CUDA
    (required without a GPU). ``device`` names the entries (default: the CUDA device's name).
    ``sizes`` overrides `REPRESENTATIVE_T` per bucket (an int or a tuple; tests use tiny ones).
    ``candidates``: how many of the cost model's ranking to time besides the current tile (see
    `trials`). ``progress(line)`` gets a line per timed candidate and per kernel and bucket.
    To tune a module compiled with `moec.compile`, use `moec.tune`.
    """
    arch = facts(program.arch)     # this GPU's limits when it is that target
    if arch.name == "cpu":
        raise ValueError("a program compiled for the CPU interpreter has fixed tiles: compile for a GPU arch to tune")
    if timer is None:
        if not torch.cuda.is_available():
            raise RuntimeError("autotune times kernels on a GPU: without CUDA pass timer=")
        timer = do_bench_timer
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("without CUDA, name the device the entries are for: device=")
        device = torch.cuda.get_device_name()
    load(path or tune_file(), fresh=True)      # a file we could not merge into fails now, not after the timing
    sizes = {**REPRESENTATIVE_T, **(sizes or {})}
    make_inputs = weights_or_inputs if callable(weights_or_inputs) else None
    gen = torch.Generator().manual_seed(seed)
    say = progress or (lambda *_: None)
    kernels = [s for s in program.steps if s.variants]
    ranges = dict(zip(BUCKETS, bucket_ranges(BUCKETS)))
    results: dict = {}
    start = time.perf_counter()
    for bound in buckets:
        lo, hi = ranges[bound]
        Ts = _sizes_of(bound, lo, hi, sizes)
        where = f"moec autotune [{device}] {bucket_key(bound)}"
        say(f"{where}: {len(kernels)} kernels at T={', '.join(map(str, Ts))}")
        captures = [_capture(program, make_inputs(T) if make_inputs else _inputs_from(program, weights_or_inputs, T, gen))
                    for T in Ts]
        for i, step in enumerate(kernels):
            runs = [c[i] for c in captures]
            problem = cost_model.problem_of(step.node, program.graph)
            base = step.variant(Ts[0]).params
            current = base.tile
            tiles = [current] + trials(problem, arch, lo, hi, current, candidates)
            saved = [{r: t.clone() for r, t in outs.items() if isinstance(t, torch.Tensor)} for _, _, outs, _ in runs]
            wants, timings = [None] * len(runs), []
            head = f"{where} kernel {i + 1}/{len(kernels)} %{step.node.name}"
            for j, tile in enumerate(tiles):
                secs, why = _time(step, dataclasses.replace(base, tile=tile), runs, wants, timer)
                timings.append((tile, secs))
                said = why or f"{secs * 1e6:.1f} us"
                say(f"{head} tile {j + 1}/{len(tiles)} {_describe(tile)}"
                    f"{' (current)' if j == 0 else ''}: {said} | {time.perf_counter() - start:.1f} s")
            for (_, _, outs, _), kept in zip(runs, saved):     # later steps read these as their operands
                for r, t in kept.items():
                    outs[r].copy_(t)
            winner = select(timings, current)
            t_win, t_cur = dict(timings)[winner], dict(timings).get(current)
            entry = {"tile": tile_to_json(winner), "us": None if t_win is None else round(t_win * 1e6, 3),
                     "default_us": None if t_cur is None else round(t_cur * 1e6, 3), "T": list(Ts),
                     "candidates": len(tiles), "triton": _triton_version()}
            key = kernel_key(step.node, program.graph)
            results.setdefault(key, {})[bucket_key(bound)] = entry
            gain = f" ({t_cur / t_win:.2f}x the current tile)" if t_cur and t_win and winner != current else ""
            say(f"{head} done: best {_describe(winner)} "
                f"{'-' if t_win is None else f'{t_win * 1e6:.1f} us'}{gain} | {key}")
    saved_to = save(device, arch.name, results, path)          # and invalidate(): recompiles see the winners
    say(f"moec autotune: {sum(len(v) for v in results.values())} entries for {device} written to {saved_to} "
        f"in {time.perf_counter() - start:.1f} s")
    return results


def _triton_version() -> str:
    return triton.__version__


def tune_model(model, example_input=None, **options) -> dict:
    """`moec.tune`: `tune` every MoE layer `moec.compile` lifted in ``model`` (see its docstring)."""
    if example_input is not None:
        with torch.no_grad():
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    say = options.get("progress", print) or (lambda *_: None)
    results, done = {}, set()
    for _, module in model.named_modules():
        region = module.__dict__.get("_moec_region")
        if not isinstance(region, MoERegion):
            continue
        tensors = list(region.lifted.param_tensors(module))
        device = tensors[0].device
        dtypes = list(dict.fromkeys(dtype for _, dtype, _ in region.compiled)) or [tensors[0].dtype]
        for dtype in dtypes:
            c = region.compiled_for(region.recipe, dtype, device)     # refreshed if an earlier tune made it stale
            key = (region.recipe, dtype, c.arch.name)
            if key in done:
                continue
            done.add(key)
            if c.arch.name == "cpu":
                say(f"moec tune: {region.name} ({dtype}) runs in the CPU interpreter, whose tiles are fixed: skipped")
                continue
            say(f"moec tune: region {region.name} ({str(dtype).split('.')[-1]} on {c.arch.name})")
            x = torch.empty(0, region.spec.hidden, dtype=dtype, device=device)
            weights = {k: v for k, v in moe_inputs(x, region.weights(tensors)).items() if k != "x"}
            for kernel, buckets in tune(c.program, weights, **options).items():
                results.setdefault(kernel, {}).update(buckets)
    if not done:
        raise ValueError(f"moec.tune: {type(model).__name__} has no MoE layer lifted by moec.compile")
    return results
