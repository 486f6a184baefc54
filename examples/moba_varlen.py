"""MoBA over packed sequences, written as MoBA's reference code writes it, compiled by moec.

    python examples/moba_varlen.py

Sequences of different lengths are packed into ``[S, heads, head_dim]`` tensors with ``cu_seqlens``
offsets, and a Python loop reads each sequence's bounds with ``.item()``: per-chunk key means, an fp32
gate with future chunks masked and the own chunk forced, top-k, a dense ``0 / -inf`` mask and softmax
attention per sequence. ``moec.compile`` traces the loop for the offsets of each call (a graph per
``cu_seqlens`` value, kept for the next call with the same packing), finds one MoBA core per
sequence, confirms it against moec's MoBA definition, and runs each on the fused gate and the
block-sparse attention kernels (the Triton interpreter on a CPU). The loop stays PyTorch.
"""
import copy
import math
import warnings

import torch
from torch import nn

import moec

warnings.filterwarnings("ignore", category=RuntimeWarning)       # the CPU interpreter's numpy warnings


class PackedMoba(nn.Module):
    def __init__(self, chunk_size=16, top_k=3):
        super().__init__()
        self.chunk_size, self.top_k = chunk_size, top_k

    def forward(self, q, k, v, cu_seqlens):                       # q, k, v: [S, H, D]
        bs, out = self.chunk_size, torch.zeros_like(q)
        for i in range(cu_seqlens.numel() - 1):
            a, b = cu_seqlens[i].item(), cu_seqlens[i + 1].item()
            n, nb = b - a, math.ceil((b - a) / bs)
            qs, ks, vs = q[a:b].float(), k[a:b].float(), v[a:b].float()
            means = torch.cat([ks[j * bs:min(n, (j + 1) * bs)].mean(0, keepdim=True) for j in range(nb)])
            gate = torch.einsum("shd,nhd->hsn", qs, means)                    # [H, n, chunks]
            for j in range(nb):
                gate[:, :(j + 1) * bs, j] = float("-inf")                     # chunks not complete yet
                gate[:, j * bs:(j + 1) * bs, j] = float("inf")               # the own chunk, always
            idx = gate.topk(min(self.top_k, nb), dim=-1).indices
            keep = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, idx, True) & (gate > float("-inf"))
            mask = keep.repeat_interleave(bs, -1)[..., :n] & torch.ones(n, n, dtype=torch.bool).tril()
            s = torch.einsum("xhd,yhd->hxy", qs, ks) / math.sqrt(q.shape[-1])
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
            out[a:b] = torch.einsum("hxy,yhd->xhd", p, vs).to(q.dtype)
        return out


torch.manual_seed(0)
model = PackedMoba()
eager = copy.deepcopy(model)                                      # the reference, copied before compiling
moec.compile(model)

with torch.no_grad():
    for lengths in ([70, 9, 40], [33, 33], [70, 9, 40]):        # the third call reuses the first's graph
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = (torch.randn(sum(lengths), 4, 16) for _ in range(3))
        err = (model(q, k, v, cu) - eager(q, k, v, cu)).abs().max().item()
        print(f"lengths {lengths}: max |compiled - eager| = {err:.2e}")
        assert err < 1e-4

print(model.explain())
assert "LIFTED  <root> (PackedMoba)" in model.explain() and "packed sequences" in model.explain()
