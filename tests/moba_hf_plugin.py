"""MoBA installed into transformers the way MoBA's own package does it: a function registered in
``ALL_ATTENTION_FUNCTIONS`` under a name of its own, which turns transformers' ``[B, H, N, D]`` tensors
into packed ``[B * N, H, D]`` sequences with ``cu_seqlens`` made from the shapes, runs the packed-sequence
loop (`moba_zoo.moba_varlen_naive`) for a prefill and plain attention over the cache for a decode step.
A fixture for moec's tests, written for them."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from moba_zoo import moba_varlen_naive

NAME = "moba_plugin"


def moba_layer(impl, chunk_size, topk, module, query, key, value, attention_mask, *args, dropout=0.0, scaling=None,
               **kwargs):
    """transformers' attention-function calling convention -> ``(out [B, N, H, D], None)``."""
    B, H, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    key = key.repeat_interleave(H // Hkv, dim=1)
    value = value.repeat_interleave(H // Hkv, dim=1)
    if Nq == Nk:                                                        # prefill: MoBA over each sequence
        q, k, v = (t.transpose(1, 2).reshape(-1, H, D) for t in (query, key, value))
        cu = torch.cumsum(torch.tensor([0] + [Nk] * B, device=query.device), dim=0, dtype=torch.int32)
        out = impl(q, k, v, cu, Nk, chunk_size, topk).view(B, Nq, H, D)
    else:                                                               # decode: the new rows see every key
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)
    return out, None


def register_moba(chunk_size: int, topk: int) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ALL_ATTENTION_FUNCTIONS[NAME] = partial(moba_layer, moba_varlen_naive, chunk_size, topk)
