"""Eager reference of Mixture-of-Block-Attention (MoBA), forward pass: the definition moec's kernels
are tested against. Simple and dense on purpose (it builds N x N masks per sequence).

Shapes: ``q [B, H, N, D]``, ``k`` and ``v [B, Hkv, N, D]``, ``H`` a multiple of ``Hkv`` (GQA: query
head ``h`` reads kv head ``h // (H // Hkv)``). With ``cu_seqlens`` (int32 ``[S+1]``, ``0 = cu[0] <=
... <= cu[S] = N``) the N rows hold S packed sequences and ``B`` must be 1.

Semantics (per sequence; positions ``t`` are counted from the sequence's start):

- **Blocks.** Block ``j`` holds keys ``[j*bs, (j+1)*bs)``; the last may be partial. Blocks restart at
  each sequence start and never cross a boundary. Query ``t`` lives in block ``c(t) = t // bs``.
- **Key convolution (optional, "kconv", for routing only).** With ``kconv_weight`` ``w [Hkv, D, kc]``
  (kc = 3 or 5 in FlashMoBA; any kc >= 1 works) the keys used for pooling are a causal depthwise
  convolution along the sequence, zero padded before its start::

      kc_k[t, d] = sum_{s=0}^{kc-1} w[hkv, d, s] * k[t - (kc-1) + s, d]     (k[t' < 0] = 0)

  i.e. ``w[..., kc-1]`` weighs the current key (``F.conv1d`` with ``groups = Hkv*D`` and ``kc-1``
  zeros of left padding). No bias, no activation. The convolved keys feed **only** the block
  representatives; attention itself always uses the raw ``k`` and ``v``.
- **Block representative.** ``pooled[j] = mean of the block's (convolved) keys over its real length``,
  computed in fp32 and then rounded to the dtype of ``k`` (as the kernels store it; MoBA's own code
  also pools in the input dtype).
- **Gate.** Score of block ``j`` for query ``t`` of head ``h``: ``q_t . pooled_hkv[j]`` (no scale), in
  fp32 (fp64 for fp64 inputs). Only past blocks ``j < c(t)`` compete; a NaN score ranks first and a
  -inf score counts as the lowest finite one (so an eligible block is never dropped for nothing).
- **Selection.** The own block ``c(t)`` is always selected; the other ``top_k - 1`` are the
  highest-scoring past blocks (all of them if fewer exist), ties to the lower block index.
  `moba_block_selection` returns them as int32 ``[B, H, N, top_k]``: the selected block indices in
  ascending order (so the own block is the last valid one), then ``-1`` in unused slots.
- **Attention.** Query ``t`` attends to the union of its selected blocks, causally inside its own
  block (key ``s <= t``), with one softmax (scale ``1/sqrt(D)``) over the whole union. Outputs:
  ``out [B, H, N, D]`` in the dtype of ``q`` and the natural log-sum-exp of the scaled scores
  ``lse [B, H, N]`` (fp32; fp64 for fp64 inputs). A row that selects no key gets ``out = 0`` and
  ``lse = -inf`` (only possible with hand-made indices); a row with a ``+inf`` score (an infinite
  key or query) gets ``out = NaN`` and ``lse = +inf``, as ``torch.softmax`` and ``torch.logsumexp`` give.

The gate gets no gradient (selection is discrete): `moba_attention_from_indices` is
differentiable in q, k and v for fixed indices, `moba_block_selection` runs without autograd.
Only ``causal=True`` is defined.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FLT_MAX = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------------------------
# argument checks (shared with the kernels' launcher and the op)

def check_inputs(q: Tensor, k: Tensor, v: Optional[Tensor], *, block_size: int, top_k: Optional[int] = None,
                 causal: bool = True, cu_seqlens: Optional[Tensor] = None,
                 kconv_weight: Optional[Tensor] = None) -> None:
    """Raise ValueError / NotImplementedError for arguments outside the definition above."""
    if not causal:
        raise NotImplementedError("MoBA is defined here for causal=True only")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, N, D] and [B, Hkv, N, D], got {list(q.shape)}, {list(k.shape)}")
    B, H, N, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if (Bk, Nk, Dk) != (B, N, D):
        raise ValueError(f"k {list(k.shape)} does not match q {list(q.shape)} (expect [B, Hkv, N, D])")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v {list(v.shape)} must have the shape of k {list(k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"the query heads ({H}) must be a multiple of the kv heads ({Hkv})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int (it counts the own block), got {top_k!r}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [S+1] of sequence starts and N")
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along N and B must be 1, got B={B}")
    if kconv_weight is not None:
        if kconv_weight.dim() != 3 or tuple(kconv_weight.shape[:2]) != (Hkv, D) or kconv_weight.shape[2] < 1:
            raise ValueError(f"kconv_weight must be [Hkv={Hkv}, D={D}, kc], got {list(kconv_weight.shape)}")


def segments(B: int, N: int, cu_seqlens: Optional[Tensor]) -> list[tuple[int, int, int]]:
    """``(batch, start, end)`` of every sequence (host values; the reference may synchronise)."""
    if cu_seqlens is None:
        return [(b, 0, N) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != N or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {cu}")
    return [(0, a, b) for a, b in zip(cu, cu[1:])]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# routing

def key_conv(k_seq: Tensor, weight: Tensor) -> Tensor:
    """Causal depthwise convolution of one sequence's keys ``[Hkv, L, D]`` (zero padded before it)."""
    Hkv, L, D = k_seq.shape
    kc = weight.shape[2]
    if L == 0:
        return k_seq
    x = k_seq.permute(0, 2, 1).reshape(1, Hkv * D, L)                     # channels = (hkv, d)
    y = F.conv1d(F.pad(x, (kc - 1, 0)), weight.reshape(Hkv * D, 1, kc).to(x.dtype), groups=Hkv * D)
    return y.reshape(Hkv, D, L).permute(0, 2, 1)


def pooled_keys(k_seq: Tensor, block_size: int, kconv_weight: Optional[Tensor] = None) -> Tensor:
    """Block representatives of one sequence ``[Hkv, L, D]`` -> ``[Hkv, ceil(L/bs), D]``: the mean of each
    block's (convolved) keys over its real length, in fp32 (fp64), rounded to ``k``'s dtype."""
    kf = k_seq.to(_compute_dtype(k_seq))
    if kconv_weight is not None:
        kf = key_conv(kf, kconv_weight)
    Hkv, L, D = kf.shape
    nb = -(-L // block_size)
    reps = [kf[:, j * block_size:min(L, (j + 1) * block_size)].mean(1) for j in range(nb)]
    pooled = torch.stack(reps, 1) if reps else kf.new_zeros(Hkv, 0, D)
    return pooled.to(k_seq.dtype).to(kf.dtype)


def gate_scores(q: Tensor, k: Tensor, *, block_size: int, cu_seqlens: Optional[Tensor] = None,
                kconv_weight: Optional[Tensor] = None) -> list[Tensor]:
    """Per sequence, the raw gate scores ``[H, L, nb]`` (``q_t . pooled[j]`` for every block, causal or
    not: masking is the caller's), for tests that need the margins."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    out = []
    for b, a, e in segments(B, N, cu_seqlens):
        pooled = pooled_keys(k[b, :, a:e], block_size, kconv_weight).repeat_interleave(G, 0)
        out.append(q[b, :, a:e].to(pooled.dtype) @ pooled.transpose(1, 2))
    return out


@torch.no_grad()
def moba_block_selection(q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool = True,
                         cu_seqlens: Optional[Tensor] = None, kconv_weight: Optional[Tensor] = None) -> Tensor:
    """The blocks each query attends to: int32 ``[B, H, N, top_k]``, ascending, ``-1`` in unused slots."""
    check_inputs(q, k, None, block_size=block_size, top_k=top_k, causal=causal, cu_seqlens=cu_seqlens,
                 kconv_weight=kconv_weight)
    B, H, N, D = q.shape
    idx = torch.full((B, H, N, top_k), -1, dtype=torch.int32, device=q.device)
    segs = segments(B, N, cu_seqlens)
    scores = gate_scores(q, k, block_size=block_size, cu_seqlens=cu_seqlens, kconv_weight=kconv_weight)
    for (b, a, e), s in zip(segs, scores):
        L = e - a
        if L == 0:
            continue
        sel = _select(s, torch.arange(L, device=q.device) // block_size, top_k)
        idx[b, :, a:e, :sel.shape[-1]] = sel.to(torch.int32)
    return idx


def _select(s: Tensor, own: Tensor, top_k: int) -> Tensor:
    """Selected blocks ``[H, L, <= top_k]`` (ascending, -1 unused) from gate scores ``s [H, L, nb]`` of
    queries in blocks ``own [L]``: the own block and the best ``top_k - 1`` past ones."""
    H, L, nb = s.shape
    blocks = torch.arange(nb, device=s.device)
    past = blocks[None, :] < own[:, None]                                     # [L, nb] eligible
    key = torch.nan_to_num(s, nan=float("inf"), posinf=float("inf"), neginf=-FLT_MAX)
    key = torch.where(past, key, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices      # ties: lower index first
    k1 = min(top_k - 1, nb)
    chosen = order[..., :k1]                                                  # [H, L, k1]
    valid = torch.gather(past.expand(H, L, nb), -1, chosen)
    sel = torch.where(valid, chosen, nb)                                      # invalid -> sorts last
    sel = torch.cat([sel, own.expand(H, L)[..., None]], -1)
    sel = torch.sort(sel, dim=-1).values
    return torch.where(sel == nb, -1, sel)


def moba_last_rows(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int) -> Tensor:
    """MoBA's output for queries that are the last ``Nq`` positions of sequences of ``N`` keys (a
    decode step or a chunk of prefill against a KV cache): ``q [B, H, Nq, D]``, ``k``/``v
    [B, Hkv, N, D]``, ``Nq <= N``; the same definition as `moba_reference` (whose rows they would be),
    at ``O(Nq * N)`` cost. Differentiable in q, k, v."""
    B, H, Nq, D = q.shape
    N = k.shape[2]
    if Nq > N:
        raise ValueError(f"q: {Nq} query rows for {N} keys (expected at most as many queries as keys)")
    G = H // k.shape[1]
    cdt = _compute_dtype(q)
    t = torch.arange(N - Nq, N, device=q.device)                              # the queries' positions
    kpos = torch.arange(N, device=q.device)
    outs = []
    for b in range(B):
        pooled = pooled_keys(k[b].detach(), block_size).repeat_interleave(G, 0)   # [H, nb, D]
        with torch.no_grad():
            s = q[b].detach().to(pooled.dtype) @ pooled.transpose(1, 2)       # [H, Nq, nb]
            sel = _select(s, t // block_size, top_k)
            nb = pooled.shape[1]
            chosen = torch.zeros(H, Nq, nb + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(-1, torch.where(sel >= 0, sel, nb).long(), True)
            allowed = chosen[..., :nb][..., kpos // block_size] & (kpos[None, :] <= t[:, None])
        ks = k[b].to(cdt).repeat_interleave(G, 0)
        vs = v[b].to(cdt).repeat_interleave(G, 0)
        scores = torch.where(allowed, (q[b].to(cdt) @ ks.transpose(1, 2)) / math.sqrt(D), float("-inf"))
        lse = torch.logsumexp(scores, -1)
        p = torch.exp(scores - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
        outs.append(p @ vs)
    return torch.stack(outs, 0).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# attention

def moba_attention_from_indices(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int,
                                cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal attention of each query over the union of the blocks ``indices [B, H, N, K]`` lists for it
    (any block numbers; ``-1`` and out-of-range entries are ignored; duplicates count once), one
    softmax with scale ``1/sqrt(D)``. Dense masked, differentiable in q, k, v. Returns (out, lse)."""
    check_inputs(q, k, v, block_size=block_size, cu_seqlens=cu_seqlens)
    B, H, N, D = q.shape
    G = H // k.shape[1]
    cdt = _compute_dtype(q)
    scale = 1.0 / math.sqrt(D)
    outs = torch.zeros(B, H, N, D, dtype=cdt, device=q.device)
    lses = torch.full((B, H, N), float("-inf"), dtype=cdt, device=q.device)
    out_rows, lse_rows = [], []
    for b, a, e in segments(B, N, cu_seqlens):
        L = e - a
        nb = -(-L // block_size)
        t = torch.arange(L, device=q.device)
        ids = indices[b, :, a:e].long()                                       # [H, L, K]
        ok = (ids >= 0) & (ids < nb)
        sel = torch.zeros(H, L, nb + 1, dtype=torch.bool, device=q.device)
        sel.scatter_(-1, torch.where(ok, ids, nb), True)                      # slot nb collects the rest
        allowed = sel[..., :nb][..., t // block_size] & (t[None, :] <= t[:, None])   # [H, L(q), L(k)]
        qs = q[b, :, a:e].to(cdt)
        ks = k[b, :, a:e].to(cdt).repeat_interleave(G, 0)
        vs = v[b, :, a:e].to(cdt).repeat_interleave(G, 0)
        s = torch.where(allowed, (qs @ ks.transpose(1, 2)) * scale, float("-inf"))
        lse = torch.logsumexp(s, -1)                                          # -inf for empty rows
        p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])   # +inf: NaN, as softmax
        out_rows.append((b, a, e, p @ vs))
        lse_rows.append((b, a, e, lse))
    # assemble without in-place writes into a leaf (keeps autograd simple)
    if out_rows:
        parts_o, parts_l = [[] for _ in range(B)], [[] for _ in range(B)]
        for (b, a, e, o), (_, _, _, l) in zip(out_rows, lse_rows):
            parts_o[b].append(o)
            parts_l[b].append(l)
        outs = torch.stack([torch.cat(p, 1) for p in parts_o], 0)
        lses = torch.stack([torch.cat(p, 1) for p in parts_l], 0)
    return outs.to(q.dtype), lses


def moba_reference(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool = True,
                   cu_seqlens: Optional[Tensor] = None, kconv_weight: Optional[Tensor] = None
                   ) -> tuple[Tensor, Tensor]:
    """MoBA forward in eager PyTorch (see the module docstring): ``(out [B, H, N, D], lse [B, H, N])``."""
    check_inputs(q, k, v, block_size=block_size, top_k=top_k, causal=causal, cu_seqlens=cu_seqlens,
                 kconv_weight=kconv_weight)
    idx = moba_block_selection(q.detach(), k.detach(), block_size=block_size, top_k=top_k, causal=causal,
                               cu_seqlens=cu_seqlens,
                               kconv_weight=None if kconv_weight is None else kconv_weight.detach())
    return moba_attention_from_indices(q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens)
