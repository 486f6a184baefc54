"""One Hugging Face transformers decoder layer at real sizes: moec against transformers' own paths.

    python benchmarks/hf_layer.py                  # GPU: Mixtral-8x7B and Qwen3-30B-A3B layers, bf16
    python benchmarks/hf_layer.py --models qwen3 --tokens 1 4096
    python benchmarks/hf_layer.py --small          # CPU: tiny configs, fp32, Triton interpreter

A one-layer model is built from a config with the real layer sizes (random weights), and its first
decoder layer is timed on ``[1, T, d]`` hidden states, prefill (T = 4096) and decode (T = 1; no KV
cache, so attention sees that one token), as

- ``eager``: ``experts_implementation="eager"`` (the per-expert loop),
- ``grouped_mm``: ``experts_implementation="grouped_mm"`` (``torch._grouped_mm``),
- ``moec``: ``moec.compile`` of the eager model (router + experts + combine lifted into moec's kernels),
- ``moec-graphs``: ``moec.compile(..., mode="reduce-overhead")``: the same kernels replayed as one CUDA
  graph per token count (decode: one graph launch instead of a launch per kernel),
- ``moec-experts``: ``experts_implementation="moec"`` (transformers' router, moec's fused experts),

each the full decoder layer (norms, attention, MoE block) and, in a second column, the MoE block
alone. Each method's layer output is checked against eager's (relative L2 error). Times are medians
of ``triton.testing.do_bench`` on a GPU; ``--small`` only proves the script runs (CPU times).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REAL = {   # the layer sizes of the released models (transformers config fields)
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                      num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8)),
    "qwen3": ("Qwen3MoeConfig", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                     num_attention_heads=32, num_key_value_heads=4, head_dim=128)),
}
SMALL = {
    "mixtral": ("MixtralConfig", dict(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                      num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3MoeConfig", dict(hidden_size=32, moe_intermediate_size=24, intermediate_size=64, num_experts=8,
                                     num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8)),
}
METHODS = ("eager", "grouped_mm", "moec", "moec-graphs", "moec-experts")


def bench(fn, cuda: bool) -> float:
    """Median milliseconds of ``fn``."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(name: str, sizes: dict, dtype, device, impl: str):
    import transformers
    cls, fields = sizes[name]
    cfg = getattr(transformers, cls)(num_hidden_layers=1, vocab_size=256, max_position_embeddings=8192,
                                     **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=impl)
    return model.eval()


def layer_call(model, T: int, device, dtype):
    """``(run_layer, run_block, block)``: closures calling decoder layer 0 and its MoE block on ``[1, T, d]``."""
    inner = model.model
    layer = inner.layers[0]
    d = model.config.hidden_size
    x = torch.randn(1, T, d, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
    pos = torch.arange(T, device=device)[None]
    rope = inner.rotary_emb(x, pos)
    block = layer.mlp

    def run_layer():
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    def run_block():
        out = block(x)
        return out[0] if isinstance(out, tuple) else out
    return run_layer, run_block


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(name: str, sizes: dict, tokens, device, dtype, log) -> list[dict]:
    import moec
    import moec.hf
    moec.hf.register()
    cuda = device.type == "cuda"
    base = build(name, sizes, dtype, device, "eager")
    models = {"eager": base, "moec": moec.compile(copy.deepcopy(base)),
              "moec-graphs": moec.compile(copy.deepcopy(base), mode="reduce-overhead")}
    for impl in ("grouped_mm", "moec"):
        m = copy.deepcopy(base)
        m.config._experts_implementation = impl
        models["grouped_mm" if impl == "grouped_mm" else "moec-experts"] = m
    rows = []
    with torch.no_grad():
        for T in tokens:
            want = None
            for method in METHODS:
                row = {"model": name, "T": T, "method": method}
                try:
                    run_layer, run_block = layer_call(models[method], T, device, dtype)
                    got = run_layer()
                    want = got if method == "eager" else want
                    row["err"] = rel_err(got, want) if method != "eager" else 0.0
                    row["layer_ms"] = bench(run_layer, cuda)
                    row["block_ms"] = bench(run_block, cuda)
                except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                log(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(REAL), choices=list(REAL))
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="tiny configs in fp32 on the CPU (interpreter)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf_layer.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.small
    if not cuda and not args.small:
        print("no GPU: run with --small (tiny shapes on the CPU) or on a machine with CUDA", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or ([1, 4096] if cuda else [1, 24])
    sizes = SMALL if args.small else REAL

    def log(row):
        if "error" in row:
            print(f"{row['model']:8s} T={row['T']:5d} {row['method']:13s} FAILED {row['error']}", flush=True)
        else:
            print(f"{row['model']:8s} T={row['T']:5d} {row['method']:13s} layer {row['layer_ms']:9.3f} ms  "
                  f"block {row['block_ms']:9.3f} ms  rel.err {row['err']:.2e}", flush=True)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (Triton interpreter; times are not GPU times)'}"
          f", dtype {dtype}")
    rows = []
    for name in args.models:
        rows += measure(name, sizes, tokens, device, dtype, log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    bad = [r for r in rows if "error" in r or r.get("err", 0) > (2e-2 if cuda else 1e-3)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
