"""A DeepSeek-V3-style MoE layer (sigmoid scores, selection-only bias, group-limited top-k,
routed scaling, a shared expert) written in eager PyTorch, compiled by moec.

    python examples/deepseek_style.py

Prints what moec read off the code (explain) and the IR after routing fusion.
"""
import torch
import torch.nn.functional as F
from torch import nn

import moec


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepSeekMoE(nn.Module):
    def __init__(self, d=32, f=16, E=16, k=4, n_group=4, topk_group=2, scale=2.5):
        super().__init__()
        self.top_k, self.n_group, self.topk_group, self.routed_scaling_factor = k, n_group, topk_group, scale
        self.weight = nn.Parameter(torch.randn(E, d) * 0.1)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.05)
        self.experts = nn.ModuleList(MLP(d, f) for _ in range(E))
        self.shared_experts = MLP(d, 2 * f)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        choice = scores + self.e_score_correction_bias
        group = choice.view(x.shape[0], self.n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group).scatter_(1, group.topk(self.topk_group, dim=-1).indices, 1)
        choice = choice.masked_fill(keep.repeat_interleave(choice.shape[1] // self.n_group, 1) == 0, 0.0)
        ids = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        out = torch.zeros_like(x, dtype=torch.float)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]).float() * w[tok, slot, None])
        return (out.to(x.dtype) + self.shared_experts(x)).reshape(shape)


torch.manual_seed(0)
model = DeepSeekMoE().eval()
with torch.no_grad():
    x = torch.randn(2, 6, 32)
    eager = model(x)
    moec.compile(model)
    y = model(x)
print(model.explain())
print("max |moec - eager|:", (y - eager).abs().max().item())
assert torch.allclose(y, eager, atol=1e-4)
(compiled,) = model._moec_region.compiled.values()
print(dict(compiled.stages)["fuse-routing"])
