"""Mixture-of-Block-Attention (MoBA), forward: eager reference, fused Triton kernels, functional op.

    from moec.moba import moba_attention
    out = moba_attention(q, k, v, block_size=128, top_k=8)            # q [B, H, N, D], k/v [B, Hkv, N, D]

- `moec.moba.reference`: the definition (`moba_reference`, `moba_block_selection`,
  `moba_attention_from_indices`), dense and eager.
- `moec.moba.ops`: `moba_attention`, registered as ``torch.ops.moec.moba_attention``; it runs
  ``runtime/moba_gate_kernel.py`` (fused gate + top-k) and ``runtime/moba_attention_kernel.py``
  (block-sparse attention) where the kernels apply, else the reference.
"""
from .ops import kernels_apply, moba_attention, moba_forward_kernels
from .reference import moba_attention_from_indices, moba_block_selection, moba_reference

__all__ = ["moba_attention", "moba_reference", "moba_block_selection", "moba_attention_from_indices",
           "moba_forward_kernels", "kernels_apply"]
