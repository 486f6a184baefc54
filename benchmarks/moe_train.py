"""MoE layer training step (forward + backward): moec against eager PyTorch, torch.compile and
torch._grouped_mm autograd, and against the roofline floor measured on the same GPU in the same run.

    python benchmarks/moe_train.py                  # GPU: Mixtral, Qwen3-30B-A3B, DeepSeek-V3; bf16
    python benchmarks/moe_train.py --models mixtral --tokens 1024 4096
    python benchmarks/moe_train.py --small          # CPU: tiny shapes, fp32, Triton interpreter

Each method computes the layer and then the gradients of the input and of the router and expert
weights for one fixed output gradient (``torch.autograd.grad``: nothing accumulates between calls):

- ``moec``: ``moec.ops.moe`` (generated forward kernels; its registered backward,
  ``torch.ops.moec.moe_backward``, runs the generated backward kernels of `moec.ir.backward`);
- ``eager``: the layer as model code writes it (`moe_layers.eager_moe`) under autograd;
- ``compile``: ``torch.compile`` of that function, forward and backward;
- ``grouped_mm``: the experts as ``torch._grouped_mm`` calls under autograd, where the build has it;
- ``floor``: ``max(FLOPs / peak, bytes / bandwidth)`` with three times the forward's FLOPs (forward,
  input gradient, weight gradient) and bytes: x and the output gradient read, the input gradient
  written, the hit experts' weights read twice and their gradients written once.

Every method's gradients are checked against eager's in the same run (relative L2 error over the
input's and every weight's gradient); moec disagreeing fails the run, a peer disagreeing is marked
INVALID. Times are medians (``triton.testing.do_bench`` on a GPU, a few wall-clock calls on a CPU),
in ms; the table goes to stdout and, with ``--out``, to ``moe_train_<arch>.json``.
``--small`` proves the script and every method on a CPU; its times say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moe import Unavailable, bench, ceilings, floor_terms, kernels_ran, moec_call, rel_err
from moe_layers import ALIASES, MODELS, eager_moe, grouped_mm_moe, make_weights

METHODS = ("moec", "eager", "compile", "grouped_mm")
DEFAULT_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
TOKENS = (128, 1024, 4096, 16384)
SMALL_TOKENS = (1, 9, 40)
FIELDS = ("w_router", "w_gate", "w_up", "w_down")


def train_floor(spec, T: int, hit: int, itemsize: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of forward + backward at T tokens with ``hit`` experts hit."""
    flops, _ = floor_terms(spec, T, hit, itemsize)
    d, f, E = spec.hidden, spec.ffn, spec.num_experts
    fs = spec.shared.width if spec.shared is not None else 0
    nbytes = (3 * T * d + 2 * E * d + 3 * hit * 3 * d * f + 3 * 3 * d * fs) * itemsize
    return 3 * flops, float(nbytes)


def step_fn(method: str, spec, w, x, dy, compiled):
    """``() -> gradients of (x, w_router, w_gate, w_up, w_down)`` for ``method``."""
    leaves = [x] + [getattr(w, n) for n in FIELDS]
    forward = {"moec": moec_call(spec, w), "eager": lambda x: eager_moe(x, w, spec),
               "compile": lambda x: compiled(x, w, spec), "grouped_mm": lambda x: grouped_mm_moe(x, w, spec)}[method]
    if method == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise Unavailable("torch._grouped_mm is not in this torch build")

    def step():
        return torch.autograd.grad(forward(x), leaves, dy, allow_unused=True)
    return step


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads if g is not None])


def measure(name: str, tokens, device, dtype, small: bool, methods, log=print) -> list[dict]:
    model = MODELS[name]
    spec = model.small if small else model.spec
    cuda = device.type == "cuda"
    w = make_weights(spec, dtype, device)
    for n in FIELDS:
        getattr(w, n).requires_grad_()
    compiled = None
    if "compile" in methods:
        torch._dynamo.reset()
        compiled = torch.compile(eager_moe)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
    rows = []
    for T in tokens:
        gen = torch.Generator().manual_seed(T)
        x = torch.randn(T, spec.hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        dy = torch.randn(T, spec.hidden, generator=gen).to(device=device, dtype=dtype)
        ref = flat(step_fn("eager", spec, w, x, dy, None)())
        with torch.no_grad():
            from moe_layers import route
            hit = int(torch.unique(route(x, w, spec.router)[0]).numel())
        flops, nbytes = train_floor(spec, T, hit, torch.finfo(dtype).bits // 8)
        row = {"model": name, "T": T, "dtype": str(dtype).replace("torch.", ""), "flops": flops, "bytes": nbytes,
               "experts_hit": hit, "gpu_timed": cuda}
        for m in methods:
            try:
                fn = step_fn(m, spec, w, x, dy, compiled)
                t0 = time.perf_counter()
                got = kernels_ran(fn) if m == "moec" else fn()
                row[f"{m}_first_call_s"] = time.perf_counter() - t0
                err = rel_err(flat(got), ref)
                row[f"{m}_grad_rel_err"] = err
                row[f"{m}_status"] = "ok" if err < tol else "invalid"
                row[f"{m}_s"] = bench(fn, cuda)
            except Unavailable as e:
                row.update({f"{m}_s": None, f"{m}_status": "unavailable", f"{m}_note": str(e)})
            except Exception as e:          # report, keep going
                row.update({f"{m}_s": None, f"{m}_status": "error", f"{m}_note": f"{type(e).__name__}: {e}"})
        rows.append(row)
        log(line(row, methods))
    return rows


def line(row: dict, methods) -> str:
    parts = [f"{row['model']:>14} T={row['T']:<6}"]
    for m in methods:
        s = row.get(f"{m}_s")
        mark = "" if row.get(f"{m}_status") == "ok" else f" [{row.get(f'{m}_status', '?').upper()}]"
        parts.append(f"{m} {s * 1e3:9.3f} ms{mark}" if s is not None else f"{m} {'-':>9}{mark}")
    if row.get("floor_s"):
        parts.append(f"floor {row['floor_s'] * 1e3:9.3f} ms")
    return "  ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, fp32, on the CPU (interpreter)")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {sorted(MODELS)}")
    ap.add_argument("--tokens", nargs="*", type=int, default=None)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default=None, help="directory for the JSON result")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        print("NOTE: CPU run: tiny shapes in fp32, moec through the Triton interpreter; GPU timings were NOT "
              "measured.")
    peak = bandwidth = None
    if cuda:
        peak, bandwidth = ceilings(device)
    rows = []
    for name in [ALIASES.get(n, n) for n in (args.models or DEFAULT_MODELS)]:
        for row in measure(name, args.tokens or (TOKENS if cuda else SMALL_TOKENS), device, dtype, not cuda,
                           args.methods):
            if peak:
                row["floor_s"] = max(row["flops"] / peak, row["bytes"] / bandwidth)
            rows.append(row)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        arch = torch.cuda.get_device_name() if cuda else "small_cpu"
        (out / f"moe_train_{'gpu' if cuda else 'small_cpu'}.json").write_text(
            json.dumps({"device": arch, "peak_flops": peak, "bandwidth_bytes_s": bandwidth, "rows": rows}, indent=1))
    bad = [r for r in rows if r.get("moec_status") != "ok"]
    for r in bad:
        print(f"FAIL: moec at {r['model']} T={r['T']}: {r.get('moec_status')} {r.get('moec_note', '')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
