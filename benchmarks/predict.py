"""The cost model's prediction of each benchmarked MoE layer's forward, per arch and token count, beside
its floor: what choose-tiles expects of the tiles it picks, to set against `benchmarks/moe.py`'s
measurements on a GPU.

For every kernel of the compiled layer (bf16, the tiles the cost model chooses with no tune file) it
adds the kernel's predicted time at T (`moec.passes.cost_model`: waves of programs, tensor cores,
device memory, L2, program starts, launches) under uniform routing. The floor is each kernel's
``max(FLOPs / peak, fewest bytes / bandwidth)`` at the arch's datasheet rates, summed. The sort the
device does after the routing kernel at T above its one-program size, and host time, are not in either.

    python benchmarks/predict.py                 # the markdown table (benchmarks/README.md has it)
    python benchmarks/predict.py --arch sm90 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layers import MODELS  # noqa: E402
from moec.compiler import compile_spec  # noqa: E402
from moec.passes import cost_model  # noqa: E402
from moec.runtime.arch import ARCHS  # noqa: E402

TOKENS = (1, 16, 128, 1024, 4096, 16384)
ARCH_NAMES = ("sm90", "sm100")


def predict(model: str, arch: str, tokens=TOKENS) -> list[dict]:
    """One row per T: the layer's predicted and floor milliseconds, their ratio, and the routed GEMMs' tiles."""
    a = ARCHS[arch]
    c = compile_spec(MODELS[model].spec, torch.bfloat16, ("y",), a)
    steps = [s for s in c.program.steps if s.variants]
    rows = []
    for t in tokens:
        predicted = floor = 0.0
        tiles = []
        for step in steps:
            problem = cost_model.problem_of(step.node, c.graph)
            tile = step.variant(t).params.tile
            predicted += problem.time(tile, a, t)
            peak = (a.fp32_tflops if getattr(problem, "fp32", False) else a.bf16_tflops) * 1e12
            floor += max(problem.flops(t) / peak, float(problem.bytes(t, cost_model.Num)) / (a.dram_gbps * 1e9))
            if step.node.op == "grouped_gemm" and "offsets" in step.node.ins:
                tiles.append(f"{tile.block_m}x{tile.block_n}x{tile.block_k}" + ("p" if tile.persistent else ""))
        rows.append({"model": model, "arch": arch, "T": t, "predicted_ms": predicted * 1e3, "floor_ms": floor * 1e3,
                     "ratio": predicted / floor, "routed_tiles": tiles})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | arch | T | predicted ms | floor ms | predicted / floor | routed GEMM tiles |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['arch']} | {r['T']} | {r['predicted_ms']:.3f} | {r['floor_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {', '.join(r['routed_tiles'])} |")
    return "\n".join(lines)


def all_rows(arches=ARCH_NAMES) -> list[dict]:
    return [r for arch in arches for model in MODELS for r in predict(model, arch)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(ARCH_NAMES), help="an arch (repeatable; default both)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = all_rows(tuple(args.arch) if args.arch else ARCH_NAMES)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
