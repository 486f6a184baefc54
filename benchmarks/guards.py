"""What a compiled MoE layer's guards cost per call (host time, no kernels).

Every call of a compiled layer first checks that what its lift relied on still holds (`moec.guards`:
the module tree, classes, instance forwards, the plain and tensor attributes, hooks, training flags).
This benchmark times that check alone, on layers of different sizes, as the median over many
repetitions of the mean of a batch of calls; and the whole host path of a call whose kernels are
skipped (``moec.disabled()`` would skip the guards too, so it times ``region.guard`` + weight binding).

    python benchmarks/guards.py            # a table, microseconds per call
    python benchmarks/guards.py --json out.json

Runs on a CPU (the guards are host code; a GPU changes nothing here).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moec  # noqa: E402
import zoo  # noqa: E402
from timing import per_call_us  # noqa: E402


def _hf(family: str, experts: int):
    import transformers
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=32, num_local_experts=experts,
                                         num_experts_per_tok=2)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=32, num_experts=experts,
                                          num_experts_per_tok=8, norm_topk_prob=True)
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


LAYERS = {
    "ModuleList, 8 experts": lambda: zoo.MixtralMoE(d=32, f=32, E=8),
    "ModuleList, 64 experts": lambda: zoo.MixtralMoE(d=32, f=32, E=64),
    "transformers Mixtral, 8 experts": lambda: _hf("mixtral", 8),
    "transformers Qwen3-MoE, 128 experts": lambda: _hf("qwen3", 128),
}


def measure(batch: int = 2000, repeats: int = 15) -> list[dict]:
    rows = []
    for name, build in LAYERS.items():
        torch.manual_seed(0)
        layer = moec.compile(build().eval())
        region = layer.__dict__.get("_moec_region")
        if region is None or region.lifted is None:
            raise SystemExit(f"{name}: not lifted:\n{layer.explain()}")
        layer(torch.randn(1, 4, 32))                       # first call: compiles, builds the guard
        tensors = lambda: region.tensors(layer)   # noqa: E731
        guard = per_call_us(lambda: region.guard(layer), batch, repeats)
        host = per_call_us(lambda: (region.guard(layer), region.weights(tensors())), batch, repeats)
        rows.append({"layer": name, "modules": sum(1 for _ in layer.modules()), "guard": guard,
                     "guard_and_weights": host})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = measure(args.batch, args.repeats)
    print(f"guard cost per call (median of {args.repeats} x {args.batch} calls; {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, torch {torch.__version__})")
    print(f"{'layer':40s} {'modules':>7s} {'guard us':>9s} {'+weights us':>12s}")
    for r in rows:
        print(f"{r['layer']:40s} {r['modules']:7d} {r['guard']['median_us']:9.1f} {r['guard_and_weights']['median_us']:12.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
