"""Decode: one token at a time through a compiled MoE layer, with CUDA graphs on a GPU.

    python examples/decode.py            # CPU: the Triton interpreter (no CUDA graphs: explain() says so)
    python examples/decode.py --steps 64 # on a CUDA GPU: fp16, graphs replayed, timed against eager

At decode an MoE layer's kernels take microseconds, so what the host does per call decides the speed.
`moec.compile(model, mode="reduce-overhead")` captures each token count's kernels as one CUDA graph on
its first call and replays it after. Every step is checked against an eager copy of the layer.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import moec


class Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax router, top-k renormalised, a loop over the experts that were picked."""

    def __init__(self, d=64, f=128, num_experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([Expert(d, f) for _ in range(num_experts)])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).softmax(dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(ids == e)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]) * w[rows, slot, None])
        return out.reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    layer = MoE().to(device, dtype).eval()
    eager = copy.deepcopy(layer)                       # the reference: a copy made before compiling
    model = moec.compile(layer, mode="reduce-overhead")

    timings = {"moec": 0.0, "eager": 0.0}
    with torch.no_grad():
        for step in range(args.steps):
            x = torch.randn(1, 1, 64, device=device, dtype=dtype)     # one new token
            outs = {}
            for name, net in (("moec", model), ("eager", eager)):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outs[name] = net(x)
                if cuda:
                    torch.cuda.synchronize()
                if step > 0:                                            # the first call compiles / captures
                    timings[name] += time.perf_counter() - start
            tol = 2e-3 if dtype == torch.float16 else 1e-4
            torch.testing.assert_close(outs["moec"], outs["eager"], rtol=tol, atol=tol)
    print(f"{args.steps} decode steps match eager ({device}, {str(dtype).replace('torch.', '')})")
    if cuda and args.steps > 1:
        per = {k: v / (args.steps - 1) * 1e6 for k, v in timings.items()}
        print(f"per step: moec {per['moec']:.1f} us, eager {per['eager']:.1f} us")
    print(model.explain())


if __name__ == "__main__":
    main()
