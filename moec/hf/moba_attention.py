"""MoBA as a transformers attention implementation: ``attn_implementation="moec_moba"``.

After `moec.hf.register` (``moec.compile`` also registers once transformers is imported)::

    cfg.moba_block_size, cfg.moba_topk = 4096, 12        # or Moonshot's name, cfg.moba_chunk_size
    model = AutoModelForCausalLM.from_pretrained(name, config=cfg, attn_implementation="moec_moba")

every attention layer of the model attends with MoBA: each query attends to ``moba_topk`` key blocks
of ``moba_block_size`` keys (its own, causally, and the best-scoring past blocks), as
`moec.moba.moba_reference` defines. A prefill (as many queries as keys) runs moec's kernels
(`moec.ops.moba_attention`); a decode step or a chunk against a KV cache computes its rows with
`moec.moba.moba_last_rows`. Block size and top-k default to Moonshot's (4096, 12) when the config
names neither. Batches must be unpadded (MoBA's blocks count from each sequence's first token).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import ops
from ..moba.reference import moba_last_rows

NAME = "moec_moba"
DEFAULT_BLOCK_SIZE, DEFAULT_TOP_K = 4096, 12


def settings(config) -> tuple[int, int]:
    """``(block size, top-k)`` from a transformers config (``moba_block_size`` or ``moba_chunk_size``,
    ``moba_topk`` or ``moba_top_k``)."""
    def read(names, default):
        return next(((n, getattr(config, n)) for n in names if getattr(config, n, None) is not None),
                    (names[0], default))
    (bs_name, bs), (k_name, k) = read(("moba_block_size", "moba_chunk_size"), DEFAULT_BLOCK_SIZE), \
        read(("moba_topk", "moba_top_k"), DEFAULT_TOP_K)
    for name, value in ((bs_name, bs), (k_name, k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}: expected a positive int, got {value!r}")
    return bs, k


def _check_mask(mask: Optional[torch.Tensor], Nq: int, Nk: int) -> None:
    """Only the causal mask of unpadded rows (or none) is MoBA's: anything else is an error."""
    if mask is None:
        return
    rows = torch.arange(Nk - Nq, Nk, device=mask.device)[:, None]
    causal = torch.arange(Nk, device=mask.device)[None, :] <= rows
    keep = mask if mask.dtype == torch.bool else mask == 0
    if keep.shape[-2:] != causal.shape or not bool((keep == causal).all()):
        raise ValueError(f"attention_mask: {NAME} attends causally within one unpadded sequence per row; "
                         f"padded batches and custom masks are not supported (use batches of equal length)")


def moba_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """transformers' attention interface: ``query [B, H, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]``
    (the cache included) -> ``(out [B, Nq, H, D], None)``."""
    block_size, top_k = settings(module.config)
    for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: {NAME} does not combine with {name} (the layer passed {kwargs[name]!r})")
    if dropout and module.training:
        raise ValueError(f"dropout: {NAME} has no attention dropout (got {dropout} in training)")
    Nq, D = query.shape[2], query.shape[3]
    Nk = key.shape[2]
    _check_mask(attention_mask, Nq, Nk)
    if scaling is not None and not math.isclose(scaling, D ** -0.5, rel_tol=1e-6):
        if not scaling > 0:
            raise ValueError(f"scaling: expected a positive softmax scale, got {scaling}")
        query = query * (scaling * math.sqrt(D))        # a positive factor leaves the block ranking as it is
    if Nq == Nk:
        out = ops.moba_attention(query, key, value, block_size=block_size, top_k=top_k)
    else:
        out = moba_last_rows(query, key, value, block_size=block_size, top_k=top_k)
    return out.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register `moba_attention_forward` as ``"moec_moba"`` with transformers' attention and mask
    interfaces (the mask interface gives it sdpa's masks). False without transformers' interfaces."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except Exception:  # noqa: BLE001 - no transformers, or one without the interfaces
        return False
    AttentionInterface.register(NAME, moba_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True
