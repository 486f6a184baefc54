"""The host time of one compiled MoE layer call, with the kernels' bodies skipped, against the eager
layer's whole call at the same token count.

At decode (T = 1 ... 16 tokens) a GPU finishes an MoE layer in tens of microseconds, so the time the
host spends per call (argument checks, guards, binding weights, building launch arguments,
dispatching ATen ops, launching) decides the speed. This benchmark measures that host time on a
CPU: moec's kernel launches are replaced by no-ops (nothing is computed: outputs are left as
allocated), so what is timed is everything moec does around its kernels. It reports, per layer and
T, microseconds per call for moec and for the eager layer (which does compute, on tiny shapes),
their ratio, the kernel launches and the ATen ops per moec call.

    python benchmarks/host.py              # a table
    python benchmarks/host.py --json out.json

Target: moec's host time at most half of the eager layer's at T = 1 (on a GPU eager's time is its
host time, as its kernels are tiny at decode).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moec  # noqa: E402
import zoo  # noqa: E402
from timing import per_call_us  # noqa: E402
from moec.runtime import launch  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    """Stands for a resolved Triton kernel: ``kernel[grid](*args, **kwargs)`` counts and does nothing."""

    def __init__(self, count: list):
        self.count = count

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.count[0] += 1
        return launch_


@contextlib.contextmanager
def kernels_skipped():
    """Kernel launches do nothing (and are counted): everything up to Triton's launch still runs
    (moec's kernel lookup included); Triton's launcher and its interpreter's patching do not."""
    count = [0]
    function, stdlib = launch.Kernel.function, launch._interpretable_stdlib

    def resolve(self, interpret):
        function(self, interpret)
        return _NoLaunch(count)

    launch.Kernel.function, launch._interpretable_stdlib = resolve, contextlib.nullcontext
    try:
        yield count
    finally:
        launch.Kernel.function, launch._interpretable_stdlib = function, stdlib


def _initialised(block):
    """A standalone transformers block's parameters are left uninitialised: draw them."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def _layers():
    out = {"zoo Mixtral (8 experts)": lambda: zoo.MixtralMoE(d=64, f=128, E=8, k=2),
           "zoo DeepSeek-V3 style": lambda: zoo.DeepseekV3MoE()}
    try:
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        cfg = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=64, num_experts=32,
                                          num_experts_per_tok=4, norm_topk_prob=True)
        out["transformers Qwen3-MoE (32 experts)"] = lambda: _initialised(Qwen3MoeSparseMoeBlock(cfg))
    except Exception:  # noqa: BLE001 - transformers is optional
        pass
    return out


def _time(fn, reps: int) -> float:
    """Median over 15 batches of the mean time of ``reps`` calls, in microseconds."""
    return per_call_us(fn, reps, 15, warmup=3)["median_us"]


def measure(reps: int = 50) -> list[dict]:
    rows = []
    torch.set_num_threads(1)
    for name, make in _layers().items():
        torch.manual_seed(0)
        eager = make().eval()
        model = moec.compile(copy.deepcopy(eager))
        region = model.__dict__.get("_moec_region")
        if region is None or region.lifted is None:
            raise SystemExit(f"{name}: not lifted:\n{model.explain()}")
        d = next(p for p in eager.parameters()).shape[-1]
        for T in (1, 16):
            x = torch.randn(1, T, d)
            with torch.no_grad():
                model(x)                                    # compile the kernels for this bucket first
                t_eager = _time(lambda: eager(x), reps)
                with kernels_skipped() as launches:
                    t_moec = _time(lambda: model(x), reps)
                    launches[0] = 0
                    counter = _Count()
                    with counter:
                        model(x)
                    n_launch = launches[0]
            rows.append({"layer": name, "T": T, "moec_us": round(t_moec, 1), "eager_us": round(t_eager, 1),
                         "ratio": round(t_moec / t_eager, 2), "launches": n_launch, "aten_ops": counter.n})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    rows = measure(args.reps)
    print(f"host time per call, kernels skipped (CPU: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread)")
    print(f"{'layer':40s} {'T':>3s} {'moec us':>9s} {'eager us':>9s} {'ratio':>6s} {'launches':>8s} {'ATen ops':>8s}")
    for r in rows:
        print(f"{r['layer']:40s} {r['T']:3d} {r['moec_us']:9.1f} {r['eager_us']:9.1f} {r['ratio']:6.2f} "
              f"{r['launches']:8d} {r['aten_ops']:8d}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
