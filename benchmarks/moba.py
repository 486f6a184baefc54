"""MoBA forward: moec's kernels vs dense causal SDPA and FlexAttention with the exact MoBA mask.

    python benchmarks/moba.py                 # GPU: H=16, D=128, bf16, causal, N = 8K .. 512K
    python benchmarks/moba.py --small         # any machine: small N, checks every result, no GPU timing

Configurations (block size / top-k, the own block counted): 128/8 and 512/4. Each row prints the
times in ms (CUDA events, median of a few runs after a warm-up): the whole op (``scheme="auto"``),
the gate, and the attention given the gate's indices in both schemes, ``rows`` (query tiles with
row masks) and ``densify`` (windows of queries owning their softmax state, the rows that selected a
block gathered into dense tiles; ``fill`` is the share of those tiles' rows that are real queries,
from the gate's actual selection), with ``|r-d|`` the largest difference of their outputs; then SDPA,
FlexAttention and the sparse floor: the time the
selected blocks need at 794 TFLOP/s (bf16 dense tensor-core peak assumed) vs the bytes a fused
forward must move at 3.0 TB/s (q, k, v and out once, lse, indices written and read back, pooled
keys), the larger of the two being the floor. FLOPs count 4*D per (query, attended key) over the
exact causal union (own block up to the query), plus 2*D per (query, past block) for the gate.
The densify scheme also reads and writes each gathered row's fp32 softmax state once per selected
block (``densify_state_bytes``: traffic that stays in L2 while a window is resident), which the floor
does not count; ``--small`` prints it beside the floor.

FlexAttention's BlockMask comes from ``create_block_mask`` over the exact per-query, per-head
selection (the indices moec's gate chose); building it evaluates the mask at every (query, key)
pair, so by default it runs up to N = 128K (``--flex-max-n``), and its build time is not counted.
On a machine without a GPU, ``--small`` runs the kernels under the Triton interpreter (fp16) at
small N, checks them against the eager reference, SDPA (where every block is selected) and
FlexAttention, prints the floors of the GPU configurations, and says that GPU timing was not
measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from moec.ir.types import T, condition
from moec.moba import moba_reference
from moec.ops import moba_attention, moba_forward_kernels
from moec.passes.choose_moba_scheme import densify_condition
from moec.passes.moba_tiles import attention_tile, densify_tile, gate_tile
from moec.runtime.arch import arch_of
from moec.runtime.moba_attention_kernel import moba_attention_fwd
from moec.runtime.moba_window_kernel import moba_window_fwd
from moec.runtime.moba_gate_kernel import moba_gate
from moec.runtime.moba_pool import pool_keys

PEAK_FLOPS = 794e12     # bf16 dense, per second
PEAK_BYTES = 3.0e12     # HBM, per second
CONFIGS = [(128, 8), (512, 4)]
SIZES = [8192, 16384, 32768, 65536, 131072, 262144, 524288]


# ----------------------------------------------------------------------------------------------
# the sparse floor

def attended_keys(N: int, bs: int, top_k: int) -> int:
    """Sum over queries of the keys MoBA attends to (no ties to worry about: only counts)."""
    total = 0
    nb = -(-N // bs)
    for c in range(nb):
        rows = min(bs, N - c * bs)
        past = min(c, top_k - 1) * bs                         # full past blocks
        total += rows * past + rows * (rows + 1) // 2         # own block, causal
    return total


def floor(N: int, H: int, Hkv: int, D: int, bs: int, top_k: int, itemsize: int = 2) -> dict:
    nb = -(-N // bs)
    flops = 4 * D * H * attended_keys(N, bs, top_k)
    gate_flops = 2 * D * H * sum(min(bs, N - c * bs) * c for c in range(nb))
    bytes_ = ((2 * H + 2 * Hkv) * N * D * itemsize          # q, out; k, v
              + H * N * 4                                   # lse
              + 2 * H * N * top_k * 4                       # indices, written then read
              + Hkv * nb * D * itemsize * 2)                # pooled keys, written then read
    t_c, t_m = (flops + gate_flops) / PEAK_FLOPS, bytes_ / PEAK_BYTES
    return dict(flops=flops + gate_flops, bytes=bytes_, compute_ms=t_c * 1e3, memory_ms=t_m * 1e3,
                floor_ms=max(t_c, t_m) * 1e3, bound="compute" if t_c >= t_m else "memory")


def densify_state_bytes(N: int, H: int, D: int, top_k: int) -> int:
    """State traffic of the densify scheme beyond a fused forward, an upper bound: every (query, selected
    block) reads and writes the query's fp32 state (acc, m, l), and the last pass reads it once."""
    state = (D + 2) * 4
    return H * N * top_k * 2 * state + H * N * state


def gathered_fill(idx: torch.Tensor, block_size: int, window: int, block_m: int) -> float:
    """The share of the densify kernel's gathered rows that are real queries for these indices
    ``[B, H, N, K]`` (one sequence per batch row): per (window, selected block), the rows that selected
    it over the ``block_m``-row chunks they take."""
    B, H, N, K = idx.shape
    own = torch.arange(N, device=idx.device) // block_size
    ok = (idx >= 0) & (idx <= own[:, None])
    win = (torch.arange(N, device=idx.device) // window)[:, None].expand(N, K)
    nb = -(-N // block_size)
    key = ((torch.arange(B * H, device=idx.device).view(B, H, 1, 1) * (-(-N // window)) + win) * (nb + 1)
           + torch.where(ok, idx.long(), nb))
    pairs = torch.unique(torch.stack([key.flatten(), torch.arange(N, device=idx.device).view(1, 1, N, 1)
                                      .expand(B, H, N, K).flatten()]), dim=1)     # (window, block, row) once
    keep = pairs[0] % (nb + 1) < nb
    _, counts = torch.unique(pairs[0][keep], return_counts=True)
    padded = ((counts + block_m - 1) // block_m * block_m).sum()
    return float(counts.sum() / padded) if padded else 1.0


# ----------------------------------------------------------------------------------------------
# baselines

def flex_moba(q, k, v, idx, bs, compile_: bool):
    """FlexAttention with the exact MoBA mask for the given indices; returns (fn, mask build seconds)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, N, _ = q.shape
    K = idx.shape[-1]

    def mask_mod(b, h, qi, ki):
        blk = ki // bs
        m = idx[b, h, qi, 0] == blk
        for i in range(1, K):
            m = m | (idx[b, h, qi, i] == blk)
        return m & (ki <= qi)

    t0 = time.perf_counter()
    mask = create_block_mask(mask_mod, B, H, N, N, device=q.device, _compile=compile_)
    build = time.perf_counter() - t0
    fa = torch.compile(flex_attention) if compile_ else flex_attention
    gqa = k.shape[1] != H
    return (lambda: fa(q, k, v, block_mask=mask, enable_gqa=gqa)), build


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def cuda_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------

def gpu(args) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, Hkv, D = args.heads, args.kv_heads or args.heads, args.head_dim
    print(f"# {torch.cuda.get_device_name()}  H={H} Hkv={Hkv} D={D} bf16 causal; times in ms")
    print(f"{'N':>7} {'bs/k':>6} {'moba':>9} {'auto':>8} {'gate':>8} {'rows':>8} {'densify':>8} {'fill':>6} "
          f"{'|r-d|':>8} {'sdpa':>9} {'flex':>9} {'floor':>8} {'bound':>7} {'moba/floor':>10}")
    for N in args.sizes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, H, N, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, Hkv, N, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, Hkv, N, D, device=dev, dtype=dt, generator=g)
        reps = 5 if N <= 65536 else 2
        t_sdpa = cuda_ms(lambda: sdpa(q, k, v), reps)
        for bs, top_k in CONFIGS:
            t_moba = cuda_ms(lambda: moba_attention(q, k, v, block_size=bs, top_k=top_k), reps)
            arch = arch_of(q.device)
            tile = densify_tile(bs, D, arch)
            pooled = pool_keys(k, bs)
            gate = dict(block_size=bs, top_k=top_k, tile=gate_tile(bs, D, arch))
            t_gate = cuda_ms(lambda: moba_gate(q, pooled, **gate), reps)
            idx = moba_gate(q, pooled, **gate)
            rows = dict(block_size=bs, tile=attention_tile(bs, D, arch))
            t_rows = cuda_ms(lambda: moba_attention_fwd(q, k, v, idx, **rows), reps)
            t_dens = cuda_ms(lambda: moba_window_fwd(q, k, v, idx, block_size=bs, tile=tile), reps)
            fill = gathered_fill(idx, bs, tile.window, tile.block_m)
            diff = (moba_attention_fwd(q, k, v, idx, **rows)[0].float()
                    - moba_window_fwd(q, k, v, idx, block_size=bs, tile=tile)[0].float()).abs().max().item()
            auto = auto_scheme(N, bs, top_k)
            t_flex = float("nan")
            if N <= args.flex_max_n:
                try:
                    fn, _ = flex_moba(q, k, v, idx, bs, compile_=True)
                    t_flex = cuda_ms(fn, reps)
                except Exception as e:                     # noqa: BLE001 - report and go on
                    print(f"  flex failed at N={N}: {type(e).__name__}: {e}", file=sys.stderr)
            f = floor(N, H, Hkv, D, bs, top_k)
            print(f"{N:>7} {bs:>3}/{top_k:<2} {t_moba:9.2f} {auto:>8} {t_gate:8.2f} {t_rows:8.2f} {t_dens:8.2f} "
                  f"{fill:6.2f} {diff:8.1e} {t_sdpa:9.2f} {t_flex:9.2f} {f['floor_ms']:8.3f} {f['bound']:>7} "
                  f"{t_moba / f['floor_ms']:10.1f}")
            del idx, pooled
        del q, k, v
        torch.cuda.empty_cache()


def auto_scheme(N: int, block_size: int, top_k: int) -> str:
    """The attention kernels ``scheme="auto"`` runs for one sequence of N tokens (choose-moba-scheme)."""
    if top_k <= 1:
        return "rows"
    return "densify" if bool(condition(densify_condition(block_size, top_k, False)).subs({T: N})) else "rows"


def small(args) -> None:
    """Correctness at small N on whatever machine this is; no GPU timing."""
    warnings.filterwarnings("ignore")
    H, Hkv, D = 2, 1, 64
    dt = torch.float16
    print("# --small: moec kernels under the Triton interpreter (fp16) vs eager reference, SDPA, FlexAttention")
    for N in (192, 320):
        g = torch.Generator().manual_seed(N)
        q = torch.randn(1, H, N, D, generator=g).to(dt)
        k = torch.randn(1, Hkv, N, D, generator=g).to(dt)
        v = torch.randn(1, Hkv, N, D, generator=g).to(dt)
        for bs, top_k in ((32, 4), (64, 2), (64, 8)):
            ref, _ = moba_reference(q, k, v, block_size=bs, top_k=top_k)
            line = f"N={N:4d} bs/k={bs}/{top_k}:"
            for scheme in ("rows", "densify"):
                t0 = time.perf_counter()
                out, lse, idx = moba_forward_kernels(q, k, v, block_size=bs, top_k=top_k, scheme=scheme)
                t_moba = time.perf_counter() - t0
                err_ref = (out.float() - ref.float()).abs().max().item()
                fn, _ = flex_moba(q.float(), k.float(), v.float(), idx, bs, compile_=False)
                err_flex = (out.float() - fn()).abs().max().item()
                line += f"  {scheme}: |ref| {err_ref:.1e} |flex| {err_flex:.1e}"
                if scheme == "densify":
                    t = densify_tile(bs, D)
                    line += f" fill {gathered_fill(idx, bs, t.window, t.block_m):.2f}"
                assert err_ref < 2e-2 and err_flex < 2e-2, line
                if -(-N // bs) <= top_k:                   # every block selected: dense causal
                    err_sdpa = (out.float() - sdpa(q.float(), k.float(), v.float())).abs().max().item()
                    assert err_sdpa < 2e-2, err_sdpa
                    line += f" |sdpa| {err_sdpa:.1e}"
                line += f" ({t_moba:.1f} s)"
            print(line)
    print("\n# sparse floor of the GPU configurations (H=16, D=128, bf16; arithmetic only)")
    print(f"{'N':>7} {'bs/k':>6} {'TFLOP':>8} {'GB':>7} {'compute ms':>11} {'memory ms':>10} {'floor ms':>9} "
          f"{'dense ms':>9} {'auto':>8} {'state GB':>9}")
    for N in SIZES:
        dense_ms = 4 * 128 * 16 * N * (N + 1) / 2 / PEAK_FLOPS * 1e3
        for bs, top_k in CONFIGS:
            f = floor(N, 16, 16, 128, bs, top_k)
            state = densify_state_bytes(N, 16, 128, top_k)
            print(f"{N:>7} {bs:>3}/{top_k:<2} {f['flops'] / 1e12:8.2f} {f['bytes'] / 1e9:7.2f} "
                  f"{f['compute_ms']:11.3f} {f['memory_ms']:10.3f} {f['floor_ms']:9.3f} {dense_ms:9.2f} "
                  f"{auto_scheme(N, bs, top_k):>8} {state / 1e9:9.2f}")
    print("\nGPU timing was not measured (no CUDA device here); run without --small on a GPU.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small N, correctness checks, no GPU timing")
    p.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="kv heads (GQA); default: as many as heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--flex-max-n", type=int, default=131072)
    args = p.parse_args(argv)
    if args.small or not torch.cuda.is_available():
        if not args.small:
            print("no CUDA device: running --small")
        small(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()
