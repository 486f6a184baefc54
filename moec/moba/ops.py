"""`moba_attention`: the MoBA forward as one functional op, registered with ``torch.library`` as
``moec::moba_attention``.

The implementation runs moec's kernels (pool the keys, the fused gate + top-k, the block-sparse
attention; the Triton interpreter on a CPU) and falls back to the eager reference where they do not
apply: float64, bfloat16 on a CPU (the Triton 3.9 interpreter gets bf16 ``tl.dot`` wrong), other
devices, mixed dtypes or devices. ``torch.compile`` sees one op (a fake implementation gives the
shapes). Autograd: the backward recomputes the eager dense attention for the **same** block indices
the forward used (`moba_attention_from_indices`) under autograd, so gradients are those of the
computed forward; the selection itself is discrete and gets no gradient (``kconv_weight`` gets
none either: it only feeds the selection).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_apply(q: Tensor, k: Tensor, v: Tensor, kconv_weight: Optional[Tensor] = None) -> bool:
    """Whether `moba_attention` runs the Triton kernels for these inputs (else the eager reference)."""
    return (q.dtype in _KERNEL_DTYPES and q.device.type in ("cpu", "cuda")
            and not (q.device.type == "cpu" and q.dtype == torch.bfloat16)
            and all(t.dtype == q.dtype and t.device == q.device for t in (k, v))
            and (kconv_weight is None or kconv_weight.device == q.device))


def moba_forward_kernels(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int,
                         cu_seqlens: Optional[Tensor] = None, kconv_weight: Optional[Tensor] = None,
                         arch=None, scheme: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The three kernel stages: ``(out, lse, indices)``. ``arch`` picks the tiles (default: the device's);
    ``scheme`` the attention kernels (``"rows"``, ``"densify"`` or ``"auto"``: see
    `moec.runtime.moba_attention_kernel.moba_attention_fwd`)."""
    from moec.runtime.moba_attention_kernel import moba_attention_fwd
    from moec.runtime.moba_common import pool_keys
    from moec.runtime.moba_gate_kernel import moba_gate
    reference.check_inputs(q, k, v, block_size=block_size, top_k=top_k, cu_seqlens=cu_seqlens,
                           kconv_weight=kconv_weight)
    pooled = pool_keys(k, block_size, cu_seqlens, kconv_weight)
    idx = moba_gate(q, pooled, block_size=block_size, top_k=top_k, cu_seqlens=cu_seqlens, arch=arch)
    out, lse = moba_attention_fwd(q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens, arch=arch,
                                  scheme=scheme)
    return out, lse, idx


def check_scheme(scheme: str) -> None:
    from moec.runtime.moba_common import SCHEMES
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


@torch.library.custom_op("moec::moba_attention", mutates_args=())
def _moba_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], kconv_weight: Optional[Tensor],
             block_size: int, top_k: int, causal: bool, scheme: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    reference.check_inputs(q, k, v, block_size=block_size, top_k=top_k, causal=causal, cu_seqlens=cu_seqlens,
                           kconv_weight=kconv_weight)
    check_scheme(scheme)
    if kernels_apply(q, k, v, kconv_weight):
        # any strides: the kernels take them as arguments (e.g. q.transpose(1, 2) of a [B, N, H, D] tensor)
        return moba_forward_kernels(q, k, v, block_size=block_size, top_k=top_k, cu_seqlens=cu_seqlens,
                                    kconv_weight=kconv_weight, scheme=scheme)
    idx = reference.moba_block_selection(q, k, block_size=block_size, top_k=top_k, causal=causal,
                                         cu_seqlens=cu_seqlens, kconv_weight=kconv_weight)
    out, lse = reference.moba_attention_from_indices(q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens)
    return out.contiguous(), lse.contiguous(), idx


@_moba_op.register_fake
def _(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal, scheme="auto"):
    B, H, N, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty_like(q), q.new_empty((B, H, N), dtype=lse_dtype),
            q.new_empty((B, H, N, top_k), dtype=torch.int32))


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, _kconv, block_size = inputs[:6]
    ctx.save_for_backward(q, k, v, output[2], cu_seqlens)
    ctx.block_size = block_size


def _backward(ctx, grad_out, grad_lse, _grad_idx):
    q, k, v, idx, cu_seqlens = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
        out, lse = reference.moba_attention_from_indices(*leaves, idx, block_size=ctx.block_size,
                                                         cu_seqlens=cu_seqlens)
        outs, grads = [out], [grad_out if grad_out is not None else torch.zeros_like(out)]
        if grad_lse is not None:
            # rows with lse = -inf (no key; only hand-made indices) carry no gradient
            outs.append(torch.where(torch.isinf(lse), 0.0, lse))
            grads.append(grad_lse.to(lse.dtype))
        wanted = [t for t, n in zip(leaves, needs) if n]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
    return (*[next(got) if n else None for n in needs], None, None, None, None, None, None)


_moba_op.register_autograd(_backward, setup_context=_setup)


def moba_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool = True,
                   cu_seqlens: Optional[Tensor] = None, kconv_weight: Optional[Tensor] = None,
                   return_lse: bool = False, scheme: str = "auto"):
    """Mixture-of-Block-Attention, forward: each query attends to ``top_k`` key blocks of ``block_size``
    keys (its own, causally, plus the best-scoring past blocks by ``q . mean(block keys)``).

    ``q [B, H, N, D]``, ``k``/``v [B, Hkv, N, D]`` (GQA when ``Hkv < H``); ``cu_seqlens`` (int32
    ``[S+1]``, with ``B = 1``) packs variable-length sequences along N; ``kconv_weight [Hkv, D, kc]``
    convolves the keys causally before pooling (routing only). The exact definition is in
    `moec.moba.reference`. Returns ``out [B, H, N, D]``, and with ``return_lse`` also the fp32
    log-sum-exp ``[B, H, N]``. Differentiable in q, k, v (the backward recomputes the eager dense
    attention for the selected blocks). ``scheme`` picks the attention kernels: ``"rows"`` (query tiles
    with row masks: short sequences), ``"densify"`` (FlashMoBA's key-block-major gathered tiles: long
    sequences) or ``"auto"`` (densify when the average sequence has more than 4 x top_k blocks; a
    threshold not yet measured on a GPU); all give the same result.

    Example::

        out = moba_attention(q, k, v, block_size=128, top_k=8)
    """
    check_scheme(scheme)
    out, lse, _ = torch.ops.moec.moba_attention(q, k, v, cu_seqlens, kconv_weight, int(block_size), int(top_k),
                                                bool(causal), scheme)
    return (out, lse) if return_lse else out
