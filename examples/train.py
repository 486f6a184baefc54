"""Training a compiled MoE layer: forward and backward run moec's generated kernels.

    python examples/train.py

An eager Mixtral-style layer is copied before compiling (the reference), both copies take the same
AdamW steps with weight decay on two micro-batches each (gradients accumulate), and their losses and
weights stay equal. The compiled layer's backward is generated from the same IR as its forward
(`moec.ir.backward`): grouped GEMMs for the input and weight gradients, the activation's backward in a
GEMM epilogue, the router's backward given the forward's choices; `explain()` lists its kernels.

What the forward keeps for the backward is a choice (`activations=`): "save" keeps the gate/up products the
activation reads (no GEMM runs twice), "recompute" keeps nothing beyond the routing and recomputes them,
"auto" (the default) takes the cheaper in time on the target. Either way less than eager autograd keeps;
`explain()` says what each training forward kept. The weights' gradients are written in the parameters'
own layout (the experts' gradients are slices of one stacked buffer).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import moec


class Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, d=32, f=64, E=8, k=2):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(Expert(d, f) for _ in range(E))
        self.k = k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(F.softmax(self.gate(x), dim=-1, dtype=torch.float), self.k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            y.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return y.reshape(shape)


torch.manual_seed(0)
eager = MoE()
compiled = moec.compile(copy.deepcopy(eager), activations="save")   # the reference: a copy made before compiling
opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (compiled, eager)]
for step in range(3):
    micro = [torch.randn(2, 8, 32) for _ in range(2)]
    losses = []
    for model, opt in zip((compiled, eager), opts):
        opt.zero_grad()
        total = 0.0
        for x in micro:                                # gradient accumulation over two micro-batches
            loss = (model(x) - x).square().mean()
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    print(f"step {step}: loss moec {losses[0]:.6f}  eager {losses[1]:.6f}")
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
for p, q in zip(compiled.parameters(), eager.parameters()):
    assert torch.allclose(p, q, atol=1e-4)             # Adam normalises tiny gradients: fp32 rounding shows
report = compiled.explain()
print("\n".join(line for line in report.splitlines() if "backward" in line or "grouped_dgrad" in line
                or "grouped_wgrad" in line or "training forward" in line))
assert "calls: 6 x backward: kernels" in report and "saved by the forward" in report
grads = [e.w1.weight.grad for e in compiled.experts]
assert len({g.untyped_storage().data_ptr() for g in grads}) == 1     # one stacked gradient, sliced
