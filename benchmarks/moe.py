"""MoE layer forward: moec against eager PyTorch, torch.compile and torch._grouped_mm, and against
the roofline floor measured on the same GPU in the same run.

    python benchmarks/moe.py                       # GPU: four models, T = 1 ... 16384, bf16
    python benchmarks/moe.py --models mixtral olmoe --tokens 1 128 4096
    python benchmarks/moe.py --tune-only --models mixtral   # GPU: autotune the layer's kernels first
    python benchmarks/moe.py --small               # CPU: tiny shapes, fp32, Triton interpreter

``benchmarks/run_gpu.sh`` runs the whole GPU suite (this benchmark, the autotune of the four
layers, MoBA) in steps that each fit a 10-minute call; see benchmarks/README.md.

Per (model, T) row:

- ``moec``: the layer compiled by moec (`moec.compiler.compile_spec`, the program `moec.ops.moe`
  runs), launched as usual; ``moec+graph``: the same call captured in a CUDA graph and replayed
  (moec's calls never synchronise, so they can be captured);
- ``eager``: the layer as model code writes it: fp32 router, top-k, then a Python loop over the
  experts that were hit (``torch.where`` + ``index_add_``), bf16 expert MLPs;
- ``compile``: ``torch.compile`` of that same eager function;
- ``grouped_mm``: the experts as two ``torch._grouped_mm`` calls on rows sorted by expert (each
  expert's rows padded to 16, sized from T only), same router, where the build has it;
- ``floor``: ``max(FLOPs / peak, bytes / bandwidth)``: FLOPs of router + routed experts + shared
  expert; bytes = x read, y written, the router's and the shared expert's weights, and the weights
  of the experts this routing actually hit, read once. ``peak`` is a large bf16 matmul and
  ``bandwidth`` a large device-to-device copy, both timed at the start of the run.

moec's output (and, on a GPU, the output of the CUDA-graph replay) is checked against eager's in
the same run (relative L2 error; a routing near-tie may send a token elsewhere, which moves the
error a little, not a lot); a mismatch fails the run. Times are medians of
``triton.testing.do_bench`` (CUDA events). Results go to ``--out`` as JSON and CSV
(``<method>_s`` seconds, ``<method>_floor_pct`` = 100 * floor / time: the share of the roofline
floor a method reaches, 100 at the floor), and, when matplotlib is installed, a plot: per model
one row, time per layer call in ms against T (every method and the floor) and % of the floor
against T (the latter only where a floor was measured, i.e. on a GPU). ``--tag`` names the files
(``moe_<arch>[_<tag>].json/.csv/.png``).

``--tune-only`` runs `moec.runtime.autotune` on each selected model's compiled layer (bf16, the
GPU's arch), one bucket at a time (each bucket's winners are saved as soon as they are timed), and
writes ``MOEC_TUNE_FILE``; later runs compile with the tuned tiles.

``--small`` runs tiny versions of the four layers in fp32 on the CPU, moec through the Triton
interpreter: it proves the script and every method work; its times are CPU times and say
nothing about a GPU, and the run says so.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from moec.compiler import compile_spec
from moec.region import graph_inputs
from moec.runtime.arch import arch_of, resolve
from moec.spec import MoESpec, MoEWeights, RouterConfig, SharedExpertConfig

TOKENS = (1, 16, 128, 1024, 4096, 16384)
SMALL_TOKENS = (1, 16, 40)
METHODS = ("moec", "moec+graph", "eager", "compile", "grouped_mm")


@dataclass(frozen=True)
class Model:
    name: str
    spec: MoESpec
    small: MoESpec              # the same layer, tiny (for --small)


def _models() -> dict[str, Model]:
    def softmax(E, k, renorm):
        return RouterConfig(E, k, renormalize=renorm)

    def dsv3(E, k, groups, keep):
        return RouterConfig(E, k, score="sigmoid", score_bias=True, n_group=groups, topk_group=keep,
                            group_score="top2_sum", renormalize=True, routed_scaling=2.5)
    return {m.name: m for m in (
        Model("mixtral-8x7b", MoESpec(4096, 14336, softmax(8, 2, True)), MoESpec(64, 128, softmax(8, 2, True))),
        Model("qwen3-30b-a3b", MoESpec(2048, 768, softmax(128, 8, True)), MoESpec(32, 16, softmax(32, 8, True))),
        Model("deepseek-v3", MoESpec(7168, 2048, dsv3(256, 8, 8, 4), shared=SharedExpertConfig(2048)),
              MoESpec(64, 32, dsv3(32, 8, 8, 4), shared=SharedExpertConfig(32))),
        Model("olmoe", MoESpec(2048, 1024, softmax(64, 8, False)), MoESpec(32, 32, softmax(16, 8, False))),
    )}


MODELS = _models()
ALIASES = {"mixtral": "mixtral-8x7b", "qwen3": "qwen3-30b-a3b", "deepseek": "deepseek-v3", "dsv3": "deepseek-v3"}


# ---- weights and the eager layer ---------------------------------------------------------------

def make_weights(spec: MoESpec, dtype, device, seed=0) -> MoEWeights:
    """Random weights drawn on ``device`` (DeepSeek-V3's experts are 11G values: a CPU draw would
    take minutes) in ``dtype``, scaled by 1/sqrt(fan-in)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    E, d, f = spec.num_experts, spec.hidden, spec.ffn

    def rnd(*shape, fan_in):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).div_(math.sqrt(fan_in))
    w = MoEWeights(w_router=rnd(E, d, fan_in=d), w_up=rnd(E, f, d, fan_in=d), w_down=rnd(E, d, f, fan_in=f),
                   w_gate=rnd(E, f, d, fan_in=d))
    if spec.router.score_bias:
        w.score_bias = torch.randn(E, generator=gen, device=device) * 0.1
    if spec.shared is not None:
        fs = spec.shared.width
        w.shared_up, w.shared_gate = rnd(fs, d, fan_in=d), rnd(fs, d, fan_in=d)
        w.shared_down = rnd(d, fs, fan_in=fs)
    return w


def route(x, w: MoEWeights, cfg: RouterConfig):
    """Model-code routing: fp32 logits, softmax/top-k (+ renormalise) or DeepSeek-V3's sigmoid with a
    selection-only bias, top-2-sum group scores, top groups, top-k, renormalised and scaled."""
    logits = x.float() @ w.w_router.float().t()
    if cfg.score == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        sel = scores + w.score_bias.float()
        T, E = sel.shape
        grouped = sel.view(T, cfg.n_group, E // cfg.n_group)
        gscore = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(cfg.topk_group, dim=-1).indices, 1.0)
        sel = sel.masked_fill(keep.repeat_interleave(E // cfg.n_group, dim=1) == 0, float("-inf"))
        ids = sel.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * cfg.routed_scaling


def _mlp(x, gate, up, down):
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def eager_moe(x, w: MoEWeights, spec: MoESpec):
    """The layer as model code writes it: a loop over the experts that were hit."""
    ids, weights = route(x, w, spec.router)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        out = _mlp(x[tok], w.w_gate[e], w.w_up[e], w.w_down[e])
        y.index_add_(0, tok, out.float() * weights[tok, slot, None])
    if spec.shared is not None:
        y += _mlp(x, w.shared_gate, w.shared_up, w.shared_down).float()
    return y.to(x.dtype)


ALIGN = 16


def grouped_mm_moe(x, w: MoEWeights, spec: MoESpec):
    """Routed experts as two ``torch._grouped_mm`` calls; rows sorted by expert, each expert's
    group padded to ALIGN rows; every size depends on T only (no host synchronisation)."""
    ids, weights = route(x, w, spec.router)
    T, k = ids.shape
    E = spec.num_experts
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    dest = ends[e_sorted] - padded[e_sorted] + torch.arange(T * k, device=x.device) - first[e_sorted]
    rows = (T * k + E * (ALIGN - 1) + ALIGN - 1) // ALIGN * ALIGN
    xa = x.new_zeros(rows, x.shape[1])
    xa[dest] = x[order // k]
    offs = ends.to(torch.int32)
    h = F.silu(torch._grouped_mm(xa, w.w_gate.transpose(1, 2), offs=offs)) * \
        torch._grouped_mm(xa, w.w_up.transpose(1, 2), offs=offs)
    out = torch._grouped_mm(h, w.w_down.transpose(1, 2), offs=offs)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y.index_add_(0, order // k, out[dest].float() * weights.reshape(-1)[order, None])
    if spec.shared is not None:
        y += _mlp(x, w.shared_gate, w.shared_up, w.shared_down).float()
    return y.to(x.dtype)


# ---- measuring ------------------------------------------------------------------------------------

def bench(fn: Callable, cuda: bool) -> float:
    """Median seconds of ``fn``."""
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


def ceilings(device) -> tuple[float, float]:
    """(bf16 FLOP/s of a large matmul, bytes/s of a large device copy), measured now."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = bench(lambda: a @ b, True)
    src = torch.randn(1 << 29, device=device, dtype=torch.float32)      # 2 GiB
    dst = torch.empty_like(src)
    t_cp = bench(lambda: dst.copy_(src), True)
    del a, b, src, dst
    return 2 * n ** 3 / t_mm, 2 * (1 << 29) * 4 / t_cp


def floor_terms(spec: MoESpec, T: int, hit: int, itemsize: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one layer call at T tokens with ``hit`` experts hit."""
    d, f, E, k = spec.hidden, spec.ffn, spec.num_experts, spec.router.top_k
    fs = spec.shared.width if spec.shared is not None else 0
    flops = 2 * T * d * E + 2 * T * k * 3 * d * f + 2 * T * 3 * d * fs
    bytes_ = (2 * T * d + E * d + hit * 3 * d * f + 3 * d * fs) * itemsize
    return float(flops), float(bytes_)


def capture_graph(run: Callable):
    """``run`` captured in a CUDA graph: returns (replay, outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph.replay, out


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(model: Model, tokens, device, dtype, small: bool, methods, log) -> list[dict]:
    spec = model.small if small else model.spec
    cuda = device.type == "cuda"
    w = make_weights(spec, dtype, device)
    arch = arch_of(device) if cuda else resolve("cpu")
    program = compile_spec(spec, dtype, ("y",), arch).program
    compiled_eager = torch.compile(eager_moe) if "compile" in methods else None
    rows = []
    for T in tokens:
        gen = torch.Generator(device="cpu").manual_seed(T)
        x = torch.randn(T, spec.hidden, generator=gen).to(dtype=dtype, device=device)
        inputs = graph_inputs(x, w)
        row = {"model": model.name, "T": T, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
        y_eager = eager_moe(x, w, spec)
        (y_moec,) = program.run(inputs)
        row["moec_vs_eager_rel_err"] = rel_err(y_moec, y_eager)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
        row["verified"] = row["moec_vs_eager_rel_err"] < tol
        ids, _ = route(x, w, spec.router)
        row["experts_hit"] = hit = int(torch.unique(ids).numel())
        row["tiles"] = {s.node.name: s.variant(T).kernel.fn_name for s in program.steps if s.variants}
        fns = {"moec": lambda: program.run(inputs), "eager": lambda: eager_moe(x, w, spec),
               "compile": (lambda: compiled_eager(x, w, spec)) if compiled_eager else None,
               "grouped_mm": (lambda: grouped_mm_moe(x, w, spec)) if hasattr(torch, "_grouped_mm") else None}
        for m in methods:
            key = f"{m}_s"
            try:
                if m == "moec+graph":
                    if not cuda:
                        row[key], row[f"{m}_note"] = None, "CUDA graphs need a GPU"
                        continue
                    replay, (y_graph,) = capture_graph(lambda: program.run(inputs))
                    y_graph.zero_()
                    replay()
                    row[f"{m}_vs_eager_rel_err"] = rel_err(y_graph, y_eager)
                    row["verified"] = row["verified"] and row[f"{m}_vs_eager_rel_err"] < tol
                    row[key] = bench(replay, cuda)
                elif fns.get(m) is None:
                    row[key], row[f"{m}_note"] = None, "not available in this torch build"
                else:
                    got = fns[m]()
                    if m != "moec":
                        row[f"{m}_vs_eager_rel_err"] = rel_err(got, y_eager)
                    row[key] = bench(fns[m], cuda)
            except Exception as e:                 # report, keep going
                row[key], row[f"{m}_note"] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        flops, nbytes = floor_terms(spec, T, hit, torch.finfo(dtype).bits // 8)
        row["flops"], row["bytes"] = flops, nbytes
        rows.append(row)
        log(row)
    return rows


# ---- output -----------------------------------------------------------------------------------------

def _fmt(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e6:.1f}" if s < 1e-1 else f"{s * 1e3:.1f}ms"


def table(rows, methods, cuda: bool) -> str:
    head = ["model", "T", *(f"{m} us" for m in methods), "floor us", "moec % of floor", "check"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        floor = r.get("floor_s")
        pct = floor_pct(r, "moec")
        ratio = f"{pct:.0f}%" if pct is not None else "n/a"
        check = f"{'ok' if r['verified'] else 'MISMATCH'} ({r['moec_vs_eager_rel_err']:.1e})"
        lines.append(" | ".join([r["model"], str(r["T"]), *(_fmt(r.get(f"{m}_s")) for m in methods),
                                 _fmt(floor), ratio, check]))
    return "\n".join(lines)


def floor_pct(row: dict, method: str) -> Optional[float]:
    """100 * floor / time: the share of the roofline floor ``method`` reaches (None: not measured)."""
    t, floor = row.get(f"{method}_s"), row.get("floor_s")
    return 100.0 * floor / t if t and floor else None


def plot(rows, methods, path: Path, title: str) -> Optional[Path]:
    """Per model a row of two panels: ms per layer call against T (every method, and the floor
    dashed) and % of the floor against T. None (and no file) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for (ax_ms, ax_pct), name in zip(axes, models):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["T"])
        for m in [*methods, "floor"]:
            pts = [(r["T"], r[f"{m}_s"] * 1e3) for r in mine if r.get(f"{m}_s")]
            if pts:
                ax_ms.plot(*zip(*pts), marker="o", linestyle="--" if m == "floor" else "-",
                           color="black" if m == "floor" else None, label=m)
        for m in methods:
            pts = [(r["T"], floor_pct(r, m)) for r in mine if floor_pct(r, m) is not None]
            if pts:
                ax_pct.plot(*zip(*pts), marker="o", label=m)
        if not any(r.get("floor_s") for r in mine):
            ax_pct.text(0.5, 0.5, "no floor measured\n(CPU run: no GPU roofline)", ha="center", va="center",
                        transform=ax_pct.transAxes)
        else:
            ax_pct.axhline(100, color="black", linestyle="--", linewidth=1)
            ax_pct.legend(fontsize=8)
        ax_ms.set_xscale("log")
        ax_ms.set_yscale("log")
        ax_ms.set_ylabel("ms per layer call")
        ax_pct.set_xscale("log")
        ax_pct.set_ylabel("% of floor (floor / time)")
        for ax, what in ((ax_ms, "time"), (ax_pct, "share of the roofline floor")):
            ax.set_title(f"{name}: {what}")
            ax.set_xlabel("tokens T")
            ax.grid(True, which="both", alpha=0.3)
        ax_ms.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tune_models(names, device, dtype, candidates: int, log=print) -> None:
    """Autotune each model's compiled layer (`moec.runtime.autotune`), bucket by bucket."""
    from moec.runtime import autotune
    from moec.runtime.tiles import BUCKETS
    if device.type != "cuda":
        log("--tune-only: autotune times kernels on a GPU; no CUDA device here, nothing tuned")
        return
    arch = arch_of(device)
    for name in names:
        spec = MODELS[name].spec
        w = make_weights(spec, dtype, device)
        weights = {k: v for k, v in graph_inputs(torch.zeros(1, spec.hidden, dtype=dtype, device=device), w).items()
                   if k != "x"}
        for bound in BUCKETS:
            t0 = time.perf_counter()
            compile_spec.cache_clear()            # every bucket compiles with what is tuned so far
            program = compile_spec(spec, dtype, ("y",), arch).program
            log(f"[tune] {name}: bucket {bound or 'largest'} ...")
            autotune.tune(program, weights, candidates=candidates, buckets=(bound,), progress=log)
            log(f"[tune] {name}: bucket {bound or 'largest'} done in {time.perf_counter() - t0:.0f} s", flush=True)
        del w, weights
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, fp32, on the CPU (interpreter)")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {sorted(MODELS)}")
    ap.add_argument("--tokens", nargs="*", type=int, default=None)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="benchmarks/results", help="directory for JSON, CSV and the plot")
    ap.add_argument("--tag", default="", help="suffix of the result files' names (moe_<arch>_<tag>.*)")
    ap.add_argument("--tune-only", action="store_true",
                    help="autotune the selected models' kernels on this GPU (writes MOEC_TUNE_FILE), then exit")
    ap.add_argument("--tune-candidates", type=int, default=4,
                    help="with --tune-only: tiles of the cost model's ranking timed besides the current one")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (TOKENS if cuda else SMALL_TOKENS)
    names = [ALIASES.get(n, n) for n in (args.models or MODELS)]
    small = not cuda
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

    def log(row):
        print(f"  {row['model']} T={row['T']}: " + ", ".join(f"{m} {_fmt(row.get(f'{m}_s'))}" for m in args.methods)
              + f", moec vs eager {row['moec_vs_eager_rel_err']:.1e}", flush=True)
    rows = []
    for name in names:
        print(f"[moe] {name}: T = {', '.join(map(str, tokens))}", flush=True)
        rows += measure(MODELS[name], tokens, device, dtype, small, args.methods, log)
    for r in rows:
        r["floor_s"] = max(r["flops"] / peak, r["bytes"] / bandwidth) if cuda else None
        r["gpu_timed"] = cuda
        for m in args.methods:
            r[f"{m}_floor_pct"] = floor_pct(r, m)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("moe_small_cpu" if not cuda else f"moe_{arch_of(device).name}") + (f"_{args.tag}" if args.tag else "")
    meta = {"gpu_timed": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_flops": peak, "bandwidth_bytes_s": bandwidth, "torch": torch.__version__}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    keys = sorted({k for r in rows for k in r if k != "tiles"})
    with open(out / f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    print()
    print(table(rows, args.methods, cuda))
    title = (f"MoE layer forward, bf16, {meta['device']}" if cuda else
             "CPU smoke run (fp32, Triton interpreter): NOT GPU timings")
    png = plot(rows, args.methods, out / f"{stem}.png", title)
    print(f"\nwrote {out / (stem + '.json')}, {out / (stem + '.csv')}"
          + (f", {png}" if png else "; NOTE: no plot, matplotlib is not installed (pip install matplotlib)"))
    if not cuda:
        print("GPU timings were NOT measured (CPU run).")
    bad = [r for r in rows if not r["verified"]]
    if bad:
        print(f"MISMATCH: moec disagrees with eager on {[(r['model'], r['T']) for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
