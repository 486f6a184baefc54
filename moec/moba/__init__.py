"""Mixture-of-Block-Attention (MoBA): what it computes.

- `moec.moba.reference`: the definition (`moba_reference`, `moba_block_selection`,
  `moba_attention_from_indices`; `moba_last_rows` for queries against a KV cache), dense and eager;
- `moec.moba.config.MobaConfig`: what a lifted MoBA core fixes (block size, top-k, heads).

The fused kernels run through `moec.ops.moba_attention` (``torch.ops.moec.moba_attention``) and,
for MoBA written in eager PyTorch, through `moec.compile`.
"""
from .config import MobaConfig
from .reference import moba_attention_from_indices, moba_block_selection, moba_last_rows, moba_reference

__all__ = ["MobaConfig", "moba_reference", "moba_block_selection", "moba_attention_from_indices", "moba_last_rows"]
