"""Mixture-of-Block-Attention (MoBA) with moec: the functional op, its eager reference, and the pieces.

    python examples/moba_attention.py

Each query attends to ``top_k`` blocks of ``block_size`` keys: its own block (causally) plus the past
blocks whose mean key scores best against it. ``moba_attention`` runs moec's Triton kernels (the
interpreter on a CPU; fp32/fp16 there, bf16 on GPUs) and is registered as ``torch.ops.moec.moba_attention``.
"""
import warnings

import torch

from moec.moba import moba_block_selection, moba_reference
from moec.ops import moba_attention, moba_forward_kernels

warnings.filterwarnings("ignore", category=RuntimeWarning)       # the CPU interpreter's numpy warnings
torch.manual_seed(0)
B, H, Hkv, N, D = 1, 4, 2, 96, 32                                  # 4 query heads share 2 kv heads (GQA)
q = torch.randn(B, H, N, D)
k, v = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)

# 1. the op vs the eager reference
out, lse = moba_attention(q, k, v, block_size=16, top_k=3, return_lse=True)
ref_out, ref_lse = moba_reference(q, k, v, block_size=16, top_k=3)
print("max |moec - eager| out:", (out - ref_out).abs().max().item(), " lse:", (lse - ref_lse).abs().max().item())
assert torch.allclose(out, ref_out, atol=1e-4) and torch.allclose(lse, ref_lse, atol=1e-4)

# 2. which blocks query 90 of head 0 attends to (its own block 5 last; -1 would mark unused slots)
_, _, idx = moba_forward_kernels(q, k, v, block_size=16, top_k=3)
print("blocks of query 90, head 0:", idx[0, 0, 90].tolist())
assert torch.equal(idx, moba_block_selection(q, k, block_size=16, top_k=3))

# 3. packed variable-length sequences (blocks restart at each start) and a key convolution for routing
cu_seqlens = torch.tensor([0, 30, 96], dtype=torch.int32)
kconv = torch.randn(Hkv, D, 3) * 0.5                               # causal depthwise, width 3
out = moba_attention(q.half(), k.half(), v.half(), block_size=16, top_k=2, cu_seqlens=cu_seqlens,
                     kconv_weight=kconv)
ref_out, _ = moba_reference(q.half(), k.half(), v.half(), block_size=16, top_k=2, cu_seqlens=cu_seqlens,
                            kconv_weight=kconv)
print("varlen + kconv, fp16: max |moec - eager|:", (out.float() - ref_out.float()).abs().max().item())
assert torch.allclose(out.float(), ref_out.float(), atol=1e-2)

# 4. gradients (the backward recomputes the eager attention over the forward's selection)
qg = q.clone().requires_grad_()
moba_attention(qg, k, v, block_size=16, top_k=3).sum().backward()
print("grad of q:", tuple(qg.grad.shape))


# 5. torch.compile keeps it as one op
@torch.compile(backend="aot_eager", fullgraph=True)
def layer(q, k, v):
    return moba_attention(q, k, v, block_size=16, top_k=3) + q


assert torch.allclose(layer(q, k, v), moba_reference(q, k, v, block_size=16, top_k=3)[0] + q, atol=1e-4)
print("torch.compile(fullgraph=True) ran torch.ops.moec.moba_attention")
