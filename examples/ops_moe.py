"""`moec.ops.moe`: call the fused MoE layer directly from new model code.

    python examples/ops_moe.py

The op is registered with torch.library as ``torch.ops.moec.moe``: autograd works (its backward,
``torch.ops.moec.moe_backward``, runs moec's generated backward kernels), and ``torch.compile`` keeps
it as one op in its graph, forward and backward.
"""
import torch

import moec

torch.manual_seed(0)
T, d, f, E = 10, 32, 64, 8
x = torch.randn(T, d, requires_grad=True)
w_router = torch.randn(E, d) * 0.2
w_gate, w_up = torch.randn(E, f, d) * 0.1, torch.randn(E, f, d) * 0.1    # nn.Linear layout [E, out, in]
w_down = torch.randn(E, d, f) * 0.1

y = moec.ops.moe(x, w_router, w_up, w_down, w_gate, top_k=2, renormalize=True)
ref = moec.ops.moe_reference(x, w_router, w_up, w_down, w_gate, top_k=2, renormalize=True)
print("max |moec - eager|:", (y - ref).abs().max().item())
assert torch.allclose(y, ref, atol=1e-4)

y.sum().backward()                                     # gradients through the op
print("grad of x:", tuple(x.grad.shape))


@torch.compile(backend="aot_eager", fullgraph=True)    # one op in the captured graph, no graph break
def block(h):
    return h + moec.ops.moe(h, w_router, w_up, w_down, w_gate, top_k=2, renormalize=True)


out = block(x.detach())
assert torch.allclose(out, x.detach() + ref.detach(), atol=1e-4)
print("torch.compile(fullgraph=True) ran moec.ops.moe:", tuple(out.shape))
