"""MoE layer forward: moec against eager PyTorch, torch.compile and torch._grouped_mm, and against
the roofline floor measured on the same GPU in the same run.

    python benchmarks/moe.py                       # GPU: four models, T = 1 ... 16384, bf16
    python benchmarks/moe.py --models mixtral olmoe --tokens 1 128 4096
    python benchmarks/moe.py --tune-only --models mixtral   # GPU: autotune the layer's kernels first
    python benchmarks/moe.py --merge benchmarks/results     # one table + plot + verdict from many runs
    python benchmarks/moe.py --small               # CPU: tiny shapes, fp32, Triton interpreter

``benchmarks/run_gpu.sh`` runs the whole GPU suite (this benchmark, the autotune of the four
layers, MoBA) step by step, each step bounded in time, and its ``summary`` step merges the steps'
files; see benchmarks/README.md. The layers, their weights and the eager and grouped_mm peers are
in ``benchmarks/moe_layers.py``; the targets, tables, plot and ``--merge`` (pure functions of the
result rows, no GPU) in ``benchmarks/moe_report.py``.

Per (model, T) row, times in milliseconds everywhere (tables, logs, plot; JSON/CSV keep seconds
in ``<method>_s``):

- ``moec``: the public entry a user calls, ``moec.ops.moe`` (Python argument handling, the
  compile-cache lookup and the launches all timed, as a decode step pays them); the run checks that
  moec's kernels ran, not the op's eager fallback. ``moec+graph``: the same call captured in a CUDA
  graph and replayed (moec's calls never synchronise, so they can be captured);
- ``eager``: the layer as model code writes it: fp32 router, top-k, then a Python loop over the
  experts that were hit (``torch.where`` + ``index_add_``), bf16 expert MLPs;
- ``compile``: ``torch.compile`` of that same eager function, default (automatic dynamic) shapes,
  one compile per model reused for every T (see benchmarks/README.md for why not ``dynamic=False``);
- ``grouped_mm``: the experts as two ``torch._grouped_mm`` calls on rows sorted by expert (each
  expert's rows padded to 16, sized from T only), same router, where the build has it;
- ``floor``: ``max(FLOPs / peak, bytes / bandwidth)``: FLOPs of router + routed experts + shared
  expert; bytes = x read, y written, the router's and the shared expert's weights, and the weights
  of the experts this routing actually hit, read once. ``peak`` is a large bf16 matmul and
  ``bandwidth`` a large device-to-device copy, both timed at the start of the run.

Every method's output is checked against eager's in the same run (relative L2 error; a routing
near-tie may send a token elsewhere, which moves the error a little, not a lot). moec disagreeing
(or failing to run) fails the run; a peer disagreeing is marked INVALID: its time is shown but
never counts as faster than moec. Per row the output gives moec / floor, the best valid peer and
moec / best peer, and per model and moec variant a verdict on moec's performance targets (within 1.2x of
the floor for T >= 1024, within 1.5x for T <= 16, faster than every peer at every T of
1 ... 16384): PASS, FAIL or not measured. Times are medians of ``triton.testing.do_bench`` (CUDA
events). Results go to ``--out`` as JSON (rows, meta, verdicts; rewritten after every row, so a
step cut off by its time limit keeps what finished), CSV, a text table and, with matplotlib
(``pip install -e '.[bench]'``), a plot: per model time against T and % of the floor against T;
without matplotlib the run says that the plot was skipped. ``--tag`` names the files
(``moe_<arch>[_<tag>].*``).

``--merge`` reads the JSON files of several runs (the per-step files of run_gpu.sh; a directory
means its ``moe_*.json``) and writes one row per (model, T) with every method of every run, the
floor from the highest peak and bandwidth any run measured, and the verdicts
(``moe_<arch>_summary.*``). Methods of a run made with tuned tiles become ``moec[tuned]`` and
``moec+graph[tuned]``. It needs no GPU.

``--tune-only`` runs `moec.autotune` on each selected model's compiled layer (bf16, the
GPU's arch), one bucket at a time (each bucket's winners are saved as soon as they are timed), and
writes ``MOEC_TUNE_FILE``; later runs compile with the tuned tiles.

``--small`` runs tiny versions of the four layers in fp32 on the CPU, moec through the Triton
interpreter: it proves the script and every method work; its times are CPU times and say
nothing about a GPU, and the run says so (its verdicts are "not measured").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import moec.ops
from moec import compiler
from moec.compiler import compile_spec
from moec.ir.build import moe_inputs
from moec.runtime.arch import arch_of, resolve
from moec.spec import MoESpec, MoEWeights

from moe_layers import ALIASES, MODELS, Model, eager_moe, grouped_mm_moe, make_weights, route
from moe_report import METHODS, TOKENS, annotate, error_text, finish, log_row, merge_main, write_json

SMALL_TOKENS = (1, 16, 40)


# ---- measuring ------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A method that cannot run here by design (no CUDA graphs on a CPU, no ``torch._grouped_mm`` in
    this build): reported, but neither a failure nor a peer that moec has to beat."""


def bench(fn: Callable, cuda: bool) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU; a few wall-clock calls on a CPU)."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device, n: int = 8192, copy_elems: int = 1 << 29) -> tuple[float, float]:
    """(FLOP/s of an n^3 matmul, bytes/s of a copy of ``copy_elems`` fp32 values), timed now: the
    floor is relative to what this device does in this run, not to a datasheet. bf16 on a GPU; on
    a CPU (tests, with small sizes) fp32, the dtype the --small run uses."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = bench(lambda: a @ b, cuda)
    src = torch.randn(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_cp = bench(lambda: dst.copy_(src), cuda)
    return 2 * n ** 3 / t_mm, 2 * copy_elems * 4 / t_cp


def floor_terms(spec: MoESpec, T: int, hit: int, itemsize: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one layer call at T tokens with ``hit`` experts hit: no kernel can
    do less than this arithmetic, nor read less than x, y, the router and shared weights and the
    hit experts' weights once (the floor is the larger of the two times)."""
    d, f, E, k = spec.hidden, spec.ffn, spec.num_experts, spec.router.top_k
    fs = spec.shared.width if spec.shared is not None else 0
    flops = 2 * T * d * E + 2 * T * k * 3 * d * f + 2 * T * 3 * d * fs
    bytes_ = (2 * T * d + E * d + hit * 3 * d * f + 3 * d * fs) * itemsize
    return float(flops), float(bytes_)


def capture_graph(run: Callable, cuda=torch.cuda):
    """``run`` captured in a CUDA graph: returns (replay, output of the captured call). Two warm-up
    calls on a side stream first, as capture requires (lazy init, allocator pools)."""
    stream = cuda.Stream()
    stream.wait_stream(cuda.current_stream())
    with cuda.stream(stream):
        for _ in range(2):
            run()
    cuda.current_stream().wait_stream(stream)
    graph = cuda.CUDAGraph()
    with cuda.graph(graph):
        out = run()
    return graph.replay, out


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def moec_call(spec: MoESpec, w: MoEWeights) -> Callable:
    """``x -> moec.ops.moe(x, ...)`` for this layer: the public entry, so what is timed includes the
    Python a user's call goes through (argument checks, spec building, compile-cache lookup)."""
    r = spec.router
    kw = dict(top_k=r.top_k, score=r.score, renormalize=r.renormalize, routed_scaling=r.routed_scaling,
              n_group=r.n_group, topk_group=r.topk_group, group_score=r.group_score, score_bias=w.score_bias)
    if spec.shared is not None:
        kw.update(shared_up=w.shared_up, shared_down=w.shared_down, shared_gate=w.shared_gate)
    return lambda x: moec.ops.moe(x, w.w_router, w.w_up, w.w_down, w.w_gate, **kw)


def kernels_ran(fn: Callable):
    """``fn()``, checking that it went through moec's compiled program: ``moec.ops.moe`` falls back
    to the eager reference for dtypes or devices its kernels do not take, and timing that would
    not be timing moec."""
    info = compiler.cache_info()
    before = info.hits + info.misses
    out = fn()
    info = compiler.cache_info()
    if info.hits + info.misses == before:
        raise RuntimeError("moec.ops.moe ran its eager fallback, not moec's kernels")
    return out


def prepare(m: str, x, w: MoEWeights, spec: MoESpec, call: Callable, compiled, cuda: bool):
    """(the callable to time, its output on ``x``) for method ``m``; the first call (compiles,
    JIT) happens here, outside the timing."""
    if m == "moec":
        return (lambda: call(x)), kernels_ran(lambda: call(x))
    if m == "moec+graph":
        if not cuda:
            raise Unavailable("CUDA graphs need a GPU")
        replay, out = capture_graph(lambda: call(x))
        out.zero_()                 # the check below must see the replay's result
        replay()
        return replay, out
    if m == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise Unavailable("torch._grouped_mm is not in this torch build")
    fn = {"eager": lambda: eager_moe(x, w, spec), "compile": lambda: compiled(x, w, spec),
          "grouped_mm": lambda: grouped_mm_moe(x, w, spec)}[m]
    return fn, fn()


def run_method(m: str, setup: Callable, y_ref, cuda: bool, tol: float) -> dict:
    """One method's fields of a row: ``<m>_s``, ``<m>_status`` (ok / invalid: output disagrees with
    eager / unavailable / error), ``<m>_vs_eager_rel_err``, ``<m>_first_call_s``, ``<m>_note``.
    Errors are recorded, not raised, so one broken method does not lose the others' numbers."""
    t0 = time.perf_counter()
    try:
        fn, got = setup()
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        err = rel_err(got, y_ref)
        out = {f"{m}_first_call_s": first, f"{m}_vs_eager_rel_err": err,
               f"{m}_status": "ok" if err < tol else "invalid", f"{m}_s": bench(fn, cuda)}
    except Unavailable as e:
        return {f"{m}_s": None, f"{m}_status": "unavailable", f"{m}_note": str(e)}
    except Exception as e:                 # report, keep going
        return {f"{m}_s": None, f"{m}_status": "error", f"{m}_note": error_text(e)}
    if out[f"{m}_status"] == "invalid":
        out[f"{m}_note"] = f"output disagrees with eager (rel. error {err:.1e} >= {tol:.0e})"
    return out


def fresh_compile():
    """``torch.compile(eager_moe)`` with default (automatic dynamic) shapes after a dynamo reset:
    dynamo's cache lives on eager_moe's code object, so without the reset the models of one run
    would share it and its recompile limit. ``dynamic=False`` is worse, not better: every expert's
    row count is a new static shape, so the loop body recompiles per expert, hits the recompile
    limit (8) and runs eagerly from then on (one warning in the log)."""
    torch._dynamo.reset()
    return torch.compile(eager_moe)


def measure(model: Model, tokens, device, dtype, small: bool, methods, on_row=None) -> list[dict]:
    """One row per T: every method's time and check against eager, the routing's experts hit,
    FLOPs and bytes (the floor comes later, from ceilings measured once per run); ``on_row`` sees
    each row as soon as it is measured (to log and save it)."""
    spec = model.small if small else model.spec
    cuda = device.type == "cuda"
    w = make_weights(spec, dtype, device)
    arch = arch_of(device) if cuda else resolve("cpu")
    program = compile_spec(spec, dtype, ("y",), arch).program
    call = moec_call(spec, w)
    compiled = fresh_compile() if "compile" in methods else None
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    rows = []
    for T in tokens:
        gen = torch.Generator(device="cpu").manual_seed(T)
        x = torch.randn(T, spec.hidden, generator=gen).to(dtype=dtype, device=device)
        ids, _ = route(x, w, spec.router)
        hit = int(torch.unique(ids).numel())
        flops, nbytes = floor_terms(spec, T, hit, torch.finfo(dtype).bits // 8)
        row = {"model": model.name, "T": T, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
               "methods": list(methods), "experts_hit": hit, "flops": flops, "bytes": nbytes,
               "gpu_timed": cuda, "moec_entry": "moec.ops.moe",
               "tiles": {s.node.name: s.variant(T).kernel.fn_name for s in program.steps if s.variants}}
        y_eager = eager_moe(x, w, spec)
        for m in methods:
            row.update(run_method(m, lambda: prepare(m, x, w, spec, call, compiled, cuda), y_eager, cuda, tol))
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def tune_models(names, device, dtype, candidates: int, log=print) -> None:
    """Autotune each model's compiled layer (`moec.autotune`), bucket by bucket."""
    from moec import autotune
    from moec.ir.tiles import BUCKETS
    if device.type != "cuda":
        log("--tune-only: autotune times kernels on a GPU; no CUDA device here, nothing tuned")
        return
    arch = arch_of(device)
    for name in names:
        spec = MODELS[name].spec
        w = make_weights(spec, dtype, device)
        weights = {k: v for k, v in moe_inputs(torch.zeros(1, spec.hidden, dtype=dtype, device=device), w).items()
                   if k != "x"}
        for bound in BUCKETS:
            t0 = time.perf_counter()
            autotune.invalidate()                 # every bucket compiles with what is tuned so far
            program = compile_spec(spec, dtype, ("y",), arch).program
            log(f"[tune] {name}: bucket {bound or 'largest'} ...")
            autotune.tune(program, weights, candidates=candidates, buckets=(bound,), progress=log)
            log(f"[tune] {name}: bucket {bound or 'largest'} done in {time.perf_counter() - t0:.0f} s", flush=True)
        del w, weights
        torch.cuda.empty_cache()


def run_meta(cuda: bool, device, peak, bandwidth, args, methods) -> dict:
    """What a result file needs to be read later on its own, or merged with others'."""
    from moec import autotune
    import triton
    arch = arch_of(device) if cuda else None
    return {"gpu_timed": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "arch": arch.name if cuda else "small_cpu", "peak_flops": peak, "bandwidth_bytes_s": bandwidth,
            "tuned": bool(cuda and autotune.lookup_for(arch) is not None), "tune_file": str(autotune.tune_file()),
            "torch": torch.__version__, "triton": triton.__version__, "tag": args.tag, "methods": list(methods),
            "compile": "torch.compile(eager_moe), automatic dynamic shapes, one per model for every T",
            "written": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, fp32, on the CPU (interpreter)")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {sorted(MODELS)}")
    ap.add_argument("--tokens", nargs="*", type=int, default=None)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="benchmarks/results", help="directory for JSON, CSV, table and plot")
    ap.add_argument("--tag", default="", help="suffix of the result files' names (moe_<arch>_<tag>.*)")
    ap.add_argument("--merge", nargs="+", metavar="PATH",
                    help="merge these result JSON files / directories into moe_<arch>_summary.* in --out, then exit")
    ap.add_argument("--tune-only", action="store_true",
                    help="autotune the selected models' kernels on this GPU (writes MOEC_TUNE_FILE), then exit")
    ap.add_argument("--tune-candidates", type=int, default=4,
                    help="with --tune-only: tiles of the cost model's ranking timed besides the current one")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge_main(args.merge, out)

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (TOKENS if cuda else SMALL_TOKENS)
    names = [ALIASES.get(n, n) for n in (args.models or MODELS)]
    if args.tune_only:
        tune_models(names, device, dtype, args.tune_candidates, log=lambda *a, **k: print(*a, flush=True))
        return 0
    if not cuda:
        print("NOTE: CPU run (--small or no GPU): tiny shapes in fp32, moec through the Triton interpreter.\n"
              "      GPU timings were NOT measured; the times below are CPU times and say nothing about a GPU.")
        if not args.small:
            print("      (no CUDA device found, so this is the --small run)")
    peak = bandwidth = None
    if cuda:
        peak, bandwidth = ceilings(device)
        print(f"device: {torch.cuda.get_device_name()} ({arch_of(device).name}); measured peak bf16 matmul "
              f"{peak / 1e12:.0f} TFLOP/s, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    meta = run_meta(cuda, device, peak, bandwidth, args, args.methods)
    stem = f"moe_{meta['arch']}" + (f"_{args.tag}" if args.tag else "")
    done: list[dict] = []

    def on_row(row):
        """Log the row and rewrite the JSON: a step cut off by its time limit keeps what finished."""
        done.append(annotate(row, peak, bandwidth, args.methods))
        log_row(row, args.methods)
        write_json(out / f"{stem}.json", meta, done)
    for name in names:
        print(f"[moe] {name}: T = {', '.join(map(str, tokens))}", flush=True)
        measure(MODELS[name], tokens, device, dtype, not cuda, args.methods, on_row)
    return finish(done, meta, args.methods, out, stem)


if __name__ == "__main__":
    sys.exit(main())
