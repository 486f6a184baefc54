"""MoBA training step (forward + backward): moec against dense causal SDPA and FlexAttention with the
exact MoBA mask, and against the sparse floor.

    python benchmarks/moba_train.py               # GPU: H=16, D=128, bf16, block 128 / top-k 8, N = 8K .. 128K
    python benchmarks/moba_train.py --small       # any machine: small N, gradients checked, no GPU timing

Each method computes the attention and then ``d q, d k, d v`` for one fixed output gradient
(``torch.autograd.grad``): ``moec`` is ``moec.ops.moba_attention`` (generated forward kernels, and its
registered backward ``torch.ops.moec.moba_attention_backward``: d q by query tiles, d k / d v
key-block-major); ``sdpa`` is dense causal attention (what MoBA replaces); ``flex`` is FlexAttention
with a BlockMask built from the indices moec's gate chose (its build is not timed). Times are medians
of CUDA-event timings, in ms. The floor counts the forward's attended-key FLOPs 3.5 times (forward
2 matmuls per key, backward 5) at 794 TFLOP/s, or the bytes at 3.0 TB/s, the larger.
``--small`` runs the kernels under the Triton interpreter at small N, checks moec's gradients against
the eager reference's (`moec.moba.moba_reference` under autograd) and its forward against FlexAttention's
(FlexAttention has no CPU backward), and says that GPU timing was not measured.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from moba import PEAK_BYTES, PEAK_FLOPS, attended_keys, cuda_ms, flex_moba, sdpa
from moec.moba import moba_reference
from moec.ops import moba_attention, moba_forward_kernels

SIZES = [8192, 16384, 32768, 65536, 131072]


def train_floor_ms(N: int, H: int, Hkv: int, D: int, bs: int, top_k: int, itemsize: int = 2) -> float:
    """The larger of 3.5x the forward's attention FLOPs at the peak and the bytes a fused training step
    moves (q, k, v, out, d out read; d q, d k, d v written; lse and indices) at the bandwidth."""
    flops = 3.5 * 4 * D * H * attended_keys(N, bs, top_k)
    nbytes = (3 * H + 4 * Hkv) * N * D * itemsize + 2 * H * N * 4 + 2 * H * N * top_k * 4
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e3


def grads_of(fn, q, k, v, d_out):
    return torch.autograd.grad(fn(q, k, v), (q, k, v), d_out)


def gpu(args) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, Hkv, D, bs, top_k = args.heads, args.kv_heads or args.heads, args.head_dim, args.block_size, args.top_k
    print(f"{'N':>7} {'moec ms':>9} {'sdpa ms':>9} {'flex ms':>9} {'floor ms':>9} {'sdpa/moec':>9}")
    for N in args.sizes:
        g = torch.Generator(device=dev).manual_seed(N)
        q = torch.randn(1, H, N, D, generator=g, device=dev, dtype=dt).requires_grad_()
        k = torch.randn(1, Hkv, N, D, generator=g, device=dev, dtype=dt).requires_grad_()
        v = torch.randn(1, Hkv, N, D, generator=g, device=dev, dtype=dt).requires_grad_()
        d_out = torch.randn(1, H, N, D, generator=g, device=dev, dtype=dt)

        def moec_fn(q, k, v):
            return moba_attention(q, k, v, block_size=bs, top_k=top_k)
        t_moec = cuda_ms(lambda: grads_of(moec_fn, q, k, v, d_out), args.reps)
        t_sdpa = cuda_ms(lambda: grads_of(sdpa, q, k, v, d_out), args.reps)
        t_flex = float("nan")
        if N <= args.flex_max_n:
            with torch.no_grad():
                _, _, idx = moba_forward_kernels(q, k, v, block_size=bs, top_k=top_k)
            fa, _ = flex_moba(q, k, v, idx, bs, compile_=True)
            t_flex = cuda_ms(lambda: torch.autograd.grad(fa(), (q, k, v), d_out), args.reps)
        floor_ms = train_floor_ms(N, H, Hkv, D, bs, top_k)
        print(f"{N:>7} {t_moec:9.3f} {t_sdpa:9.3f} {t_flex:9.3f} {floor_ms:9.3f} {t_sdpa / t_moec:9.2f}", flush=True)


def small(args) -> None:
    warnings.filterwarnings("ignore")
    print("# --small: moec's forward + backward kernels under the Triton interpreter vs the eager reference "
          "and FlexAttention (fp32)")
    worst = 0.0
    for N, bs, top_k, H, Hkv in ((96, 16, 3, 4, 2), (160, 32, 2, 2, 2)):
        gen = torch.Generator().manual_seed(N)
        q, k, v = (torch.randn(1, h, N, 32, generator=gen).requires_grad_() for h in (H, Hkv, Hkv))
        d_out = torch.randn(1, H, N, 32, generator=gen)
        got = grads_of(lambda q, k, v: moba_attention(q, k, v, block_size=bs, top_k=top_k), q, k, v, d_out)
        want = grads_of(lambda q, k, v: moba_reference(q, k, v, block_size=bs, top_k=top_k)[0], q, k, v, d_out)
        with torch.no_grad():          # FlexAttention has no CPU backward: its forward is checked here
            out, _, idx = moba_forward_kernels(q, k, v, block_size=bs, top_k=top_k)
            fa, _ = flex_moba(q.detach(), k.detach(), v.detach(), idx, bs, compile_=False)
            err_flex = (out - fa()).abs().max().item()
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        worst = max(worst, err, err_flex)
        print(f"N={N} bs/k={bs}/{top_k} H/Hkv={H}/{Hkv}: gradients max |moec - eager| {err:.1e}; "
              f"forward |moec - flex| {err_flex:.1e}")
    print("\n# training floor of the GPU configuration (H=16, D=128, bf16, block 128, top-k 8)")
    for N in SIZES:
        print(f"N={N:>7}: {train_floor_ms(N, 16, 16, 128, 128, 8):8.3f} ms")
    print("\nGPU timing was not measured (no CUDA device here); run without --small on a GPU.")
    if worst > 1e-3:
        raise SystemExit(f"FAIL: gradients disagree ({worst:.1e})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small N, gradients checked, no GPU timing")
    p.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="kv heads (GQA); default: as many as heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--flex-max-n", type=int, default=131072)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if args.small or not torch.cuda.is_available():
        small(args)
    else:
        gpu(args)


if __name__ == "__main__":
    sys.exit(main())
