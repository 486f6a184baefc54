"""Quick start: compile a small MoE transformer block, check it against eager PyTorch, dump kernels.

    python examples/quickstart.py            # CPU: kernels run in the Triton interpreter (fp32)
    python examples/quickstart.py --bf16     # on a CUDA GPU: bf16, timed against eager

The block is ordinary eager code (attention + a Mixtral-style MoE with a loop over experts).
`moec.compile` lifts the MoE into moec IR and runs generated Triton kernels for it; attention
stays PyTorch. Everything moec generated is written under ``--dump`` (default ./moec_dump).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moec


class Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral-style: softmax router, top-k, renormalise, loop over experts, index_add_."""

    def __init__(self, d, f, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, f) for _ in range(num_experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for i, expert in enumerate(self.experts):
            slot, token = torch.where(mask[i])
            if token.numel() == 0:
                continue
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, d=64, heads=4, f=128, num_experts=8, top_k=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.moe = SparseMoE(d, f, num_experts, top_k)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, d))
        return x + self.moe(self.norm2(x))


def timed(fn, device, reps=20):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", action="store_true", help="bf16 on a CUDA GPU (with a timing against eager)")
    ap.add_argument("--dump", default="moec_dump", help="where to write IR, kernels, tiles, launches")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.bf16 and device == "cpu":
        raise SystemExit("--bf16 needs a CUDA GPU (the CPU interpreter's bf16 dot is unreliable)")
    if args.bf16:
        block_args = dict(d=1024, heads=8, f=2048, num_experts=8, top_k=2)
    else:
        block_args = {}

    torch.manual_seed(0)
    model = Block(**block_args).to(device, dtype).eval()
    model = moec.compile(model, dump_dir=args.dump)          # lifts model.moe, compiles in place
    x = torch.randn(2, args.tokens // 2, model.qkv.in_features, device=device, dtype=dtype)

    with torch.no_grad():
        y = model(x)
        with moec.disabled():                                 # the same model, eager
            y_eager = model(x)
    err = ((y.float() - y_eager.float()).norm() / y_eager.float().norm()).item()
    print(model.explain())
    print(f"\nrelative error vs eager: {err:.2e}")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert err < tol, f"compiled output differs from eager ({err:.2e} >= {tol})"

    with torch.no_grad():                                     # other token counts: no recompilation
        for T in (1, 7, 30):
            model(torch.randn(1, T, x.shape[-1], device=device, dtype=dtype))
    region = model.moe._moec_region
    print(f"compiled programs after T = {args.tokens}, 1, 7, 30: {len(region.compiled)}")

    if device == "cuda":
        with torch.no_grad():
            xt = torch.randn(1, 4096, x.shape[-1], device=device, dtype=dtype)
            t_moec = timed(lambda: model(xt), device)
            with moec.disabled():
                t_eager = timed(lambda: model(xt), device)
        print(f"block forward, 4096 tokens: moec {t_moec:.3f} ms, eager {t_eager:.3f} ms")

    files = sorted(p.relative_to(args.dump) for p in Path(args.dump).rglob("*") if p.is_file())
    print(f"\n{len(files)} files dumped under {args.dump}/, e.g.:")
    for p in files[:12]:
        print("  ", p)


if __name__ == "__main__":
    main()
