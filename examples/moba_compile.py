"""MoBA written in plain PyTorch inside a model, compiled by moec: the core becomes moec's IR ops and kernels.

    python examples/moba_compile.py

The attention below is what model code looks like: q/k/v projections, a reshape to heads, then a
MoBA core (mean-pool each block of keys, score blocks with a matmul, mask future blocks, force the own
block, top-k, build a token mask and run masked softmax attention), then the output projection.
``@moec.compile`` traces the forward (specialised to the call's shapes), finds the core, probes it
against moec's MoBA definition at several sequence lengths, and replaces it by the fused gate and the
block-sparse attention kernels (the Triton interpreter on a CPU). The projections stay PyTorch.
A variant that pools blocks with ``amax`` is left eager, and ``explain()`` says why.
"""
import math
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moec

warnings.filterwarnings("ignore", category=RuntimeWarning)       # the CPU interpreter's numpy warnings


class MobaSelfAttention(nn.Module):
    def __init__(self, d=64, heads=4, kv_heads=2, block_size=16, top_k=3, pool="mean"):
        super().__init__()
        self.h, self.hkv, self.dh = heads, kv_heads, d // heads
        self.block_size, self.top_k, self.pool = block_size, top_k, pool
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.h, self.dh).transpose(1, 2)           # [B, H, N, D]
        k = self.k_proj(x).view(B, N, self.hkv, self.dh).transpose(1, 2)         # [B, Hkv, N, D]
        v = self.v_proj(x).view(B, N, self.hkv, self.dh).transpose(1, 2)
        bs, G = self.block_size, self.h // self.hkv
        nb = math.ceil(N / bs)
        blocks = F.pad(k, (0, 0, 0, nb * bs - N)).view(B, self.hkv, nb, bs, self.dh)
        pooled = blocks.amax(3) if self.pool == "max" else blocks.mean(3)        # one key per block
        gate = q @ pooled.repeat_interleave(G, 1).transpose(-1, -2)             # [B, H, N, nb]
        q_blk = torch.arange(N, device=x.device) // bs
        blk = torch.arange(nb, device=x.device)
        gate = gate.masked_fill(blk > q_blk[:, None], float("-inf"))             # no future blocks
        gate = gate.masked_fill(blk == q_blk[:, None], float("inf"))             # always the own block
        idx = gate.topk(min(self.top_k, nb), dim=-1).indices
        chosen = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, idx, True)
        mask = chosen.repeat_interleave(bs, -1)[..., :N] & torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) / math.sqrt(self.dh)
        o = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.repeat_interleave(G, 1)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MobaSelfAttention()
        self.maxpool_attn = MobaSelfAttention(pool="max")     # not MoBA: stays eager, explain() says why

    def forward(self, x):
        return self.maxpool_attn(x + self.attn(x))


torch.manual_seed(0)
model = Model()
eager = Model()
eager.load_state_dict(model.state_dict())
scratch = tempfile.TemporaryDirectory()                        # removed when the script ends
dump = Path(scratch.name) / "moec_dump"
moec.compile(model, dump_dir=dump)

with torch.no_grad():
    for N in (70, 9, 1):                                       # one specialised forward per shape
        x = torch.randn(2, N, 64)
        err = (model(x) - eager(x)).abs().max().item()
        print(f"N={N:3d}: max |compiled - eager| = {err:.2e}")
        assert err < 1e-4

print(model.explain())
print("dumped:", sorted(p.name for p in (dump / "attn_moba.float32.cpu").iterdir()))
print((dump / "attn_moba.float32.cpu" / "ir.05.choose-tiles.txt").read_text())
assert "LIFTED  attn (MobaSelfAttention)" in model.explain()
assert "amax-pooled keys" in model.explain()
