"""Eager MoBA, written the ways model code writes it: fixtures for the MoBA frontend's tests.

Core functions take ``q [B, H, N, D]``, ``k``/``v [B, Hkv, N, D]`` and return ``[B, H, N, D]``:

- `moba_dense_mask`: mean-pool the keys of each block (pad + reshape + mean), gate scores with a
  matmul, mask future blocks, force the own block (+inf), top-k, a ``[B, H, N, N]`` boolean token
  mask from the selected blocks and the causal triangle, then masked softmax attention (einsum +
  softmax + matmul) or ``F.scaled_dot_product_attention(attn_mask=...)``;
- `moba_gather`: the same gate, then the keys and values of the selected blocks gathered per query
  (advanced indexing), attention over the gathered keys with the causal mask inside the own block;
- `moba_loop`: MoBA's own naive style: Python loops over the blocks (slice means, in-place masks);
- `moba_bnhd`: the dense-mask core on ``[B, N, H, D]`` tensors (the flash-attention layout), einsums;
- `moba_sum_count`: means as padded block sums over real-token counts, the past blocks' top-(k-1) by
  ``scatter``, the own block OR-ed in by a mask (not forced by ``inf``);
- `moba_varlen_loop` (`VarlenLoopMoba`): packed ``[S, H, D]`` tensors and ``cu_seqlens``, one Python iteration
  per sequence with its bounds read by ``.item()``, empty sequences skipped;
- `moba_varlen_naive` (`VarlenNaiveMoba`): the same loop as MoBA's reference implementation writes it
  (a threshold at the k-th gate value and the ``topk`` indices, an additive ``0/-inf`` mask, fp32, the
  output accumulated into views); `PackedMobaAttention` packs a batch itself (``cu_seqlens`` from shapes).

Flags make the variants moec must *not* lift: max-pooled representatives, no own-block forcing,
attention not causal. `MobaAttention` wraps a core in q/k/v/o projections and a reshape to heads;
``block_size=None`` there means a block size computed from the sequence length (not a constant).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _gate(q, k, block_size, top_k, pool="mean", force_own=True):
    """Top-k block indices ``[B, H, N, kk]`` (own block forced unless told otherwise)."""
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    nb = (N + block_size - 1) // block_size
    kp = F.pad(k, (0, 0, 0, nb * block_size - N))
    blocks = kp.reshape(B, Hkv, nb, block_size, D)
    pooled = blocks.amax(dim=3) if pool == "max" else blocks.mean(dim=3)
    gate = q @ pooled.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)           # [B, H, N, nb]
    q_blk = torch.arange(N, device=q.device) // block_size
    blk = torch.arange(nb, device=q.device)
    gate = gate.masked_fill(blk[None, :] > q_blk[:, None], float("-inf"))
    if force_own:
        gate = gate.masked_fill(blk[None, :] == q_blk[:, None], float("inf"))
    return torch.topk(gate, k=min(top_k, nb), dim=-1).indices, nb


def moba_dense_mask(q, k, v, block_size, top_k, *, sdpa=False, pool="mean", force_own=True, causal=True):
    B, H, N, D = q.shape
    G = H // k.shape[1]
    idx, nb = _gate(q, k, block_size, top_k, pool, force_own)
    chosen = torch.zeros(B, H, N, nb, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
    mask = chosen.repeat_interleave(block_size, dim=-1)[..., :N]                    # [B, H, N, N]
    if causal:
        mask = mask & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    if sdpa:
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    s = torch.einsum("bhnd,bhmd->bhnm", q, kk) * D ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ vv


def moba_gather(q, k, v, block_size, top_k, *, causal=True):
    B, H, N, D = q.shape
    G = H // k.shape[1]
    idx, nb = _gate(q, k, block_size, top_k)                                         # [B, H, N, kk]
    pad = nb * block_size - N
    kb = F.pad(k, (0, 0, 0, pad)).view(B, -1, nb, block_size, D).repeat_interleave(G, dim=1)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, -1, nb, block_size, D).repeat_interleave(G, dim=1)
    b_i = torch.arange(B, device=q.device)[:, None, None, None]
    h_i = torch.arange(H, device=q.device)[None, :, None, None]
    kg = kb[b_i, h_i, idx].flatten(3, 4)                                             # [B, H, N, kk*bs, D]
    vg = vb[b_i, h_i, idx].flatten(3, 4)
    kpos = (idx[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(3)
    pos = torch.arange(N, device=q.device)
    s = torch.einsum("bhnd,bhnjd->bhnj", q, kg) / math.sqrt(D)
    s = s.masked_fill(kpos >= N, float("-inf"))                                      # padding
    if causal:
        s = s.masked_fill(kpos > pos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhnj,bhnjd->bhnd", p, vg)


def moba_loop(q, k, v, block_size, top_k):
    B, H, N, D = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    nb = math.ceil(N / block_size)
    bs = block_size
    pooled = torch.cat([k[:, :, i * bs:(i + 1) * bs].mean(dim=2, keepdim=True) for i in range(nb)], dim=2)
    gate = torch.einsum("bhnd,bhjd->bhnj", q, pooled)
    for i in range(nb):
        gate[:, :, i * bs:(i + 1) * bs, i + 1:] = float("-inf")
        gate[:, :, i * bs:(i + 1) * bs, i] = float("inf")
    idx = gate.topk(min(top_k, nb), dim=-1).indices
    sel = torch.zeros(B, H, N, nb, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
    mask = sel.repeat_interleave(bs, dim=-1)[..., :N].tril()
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    return s.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def moba_bnhd(q, k, v, block_size, top_k):
    """The dense-mask core in the flash-attention layout: ``q [B, N, H, D]``, ``k``/``v [B, N, Hkv, D]``."""
    B, N, H, D = q.shape
    G = H // k.shape[2]
    nb = math.ceil(N / block_size)
    kb = F.pad(k, (0, 0, 0, 0, 0, nb * block_size - N)).view(B, nb, block_size, -1, D)
    gate = torch.einsum("bnhd,bjhd->bhnj", q, kb.mean(dim=2).repeat_interleave(G, dim=2))
    q_blk = torch.arange(N, device=q.device) // block_size
    blk = torch.arange(nb, device=q.device)
    gate = gate.masked_fill(blk > q_blk[:, None], float("-inf")).masked_fill(blk == q_blk[:, None], float("inf"))
    idx = gate.topk(min(top_k, nb), dim=-1).indices
    chosen = torch.zeros(B, H, N, nb, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
    mask = chosen.repeat_interleave(block_size, dim=-1)[..., :N].tril()
    s = torch.einsum("bnhd,bmhd->bhnm", q, k.repeat_interleave(G, dim=2)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v.repeat_interleave(G, dim=2))


def moba_sum_count(q, k, v, block_size, top_k):
    """Block means as padded sums over real-token counts, the top-(k-1) past blocks picked by ``scatter`` and
    the own block OR-ed into the selection by a mask (no ``inf``), a dense token mask and softmax."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    nb = -(-N // block_size)
    sums = F.pad(k, (0, 0, 0, nb * block_size - N)).view(B, -1, nb, block_size, D).sum(dim=3)
    counts = (N - torch.arange(nb, device=q.device) * block_size).clamp(max=block_size)
    means = (sums / counts[:, None].to(k.dtype)).repeat_interleave(G, dim=1)
    q_blk = torch.arange(N, device=q.device)[:, None] // block_size
    blk = torch.arange(nb, device=q.device)[None, :]
    past = blk < q_blk
    gate = torch.matmul(q, means.transpose(-1, -2)).masked_fill(~past, float("-inf"))
    sel = torch.zeros(B, H, N, nb, dtype=torch.bool, device=q.device)
    if top_k > 1 and nb > 1:
        top = gate.topk(min(top_k - 1, nb), dim=-1)
        sel = sel.scatter(-1, top.indices, top.values > float("-inf"))
    sel = sel | (blk == q_blk)
    mask = sel.repeat_interleave(block_size, dim=-1)[..., :N] & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    s = torch.matmul(q, k.repeat_interleave(G, dim=1).transpose(-1, -2)) * D ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v.repeat_interleave(G, dim=1)


FORMULATIONS = {
    "dense": moba_dense_mask,
    "sdpa": lambda q, k, v, bs, top_k: moba_dense_mask(q, k, v, bs, top_k, sdpa=True),
    "gather": moba_gather,
    "loop": moba_loop,
    "bnhd": moba_bnhd,                       # [B, N, H, D] in and out
    "sum_count": moba_sum_count,
    # variants moec must leave eager, each for a named reason
    "maxpool": lambda q, k, v, bs, top_k: moba_dense_mask(q, k, v, bs, top_k, pool="max"),
    "no_own_block": lambda q, k, v, bs, top_k: moba_dense_mask(q, k, v, bs, top_k, force_own=False),
    "non_causal": lambda q, k, v, bs, top_k: moba_gather(q, k, v, bs, top_k, causal=False),
}


class MobaCore(nn.Module):
    """``forward(q, k, v)``: one MoBA core, no parameters."""

    def __init__(self, block_size=16, top_k=3, formulation="dense"):
        super().__init__()
        self.block_size, self.top_k, self.formulation = block_size, top_k, formulation

    def forward(self, q, k, v):
        return FORMULATIONS[self.formulation](q, k, v, self.block_size, self.top_k)


class MobaAttention(nn.Module):
    """Causal self-attention with a MoBA core between q/k/v projections and the output projection."""

    def __init__(self, d=64, heads=4, kv_heads=2, block_size=16, top_k=3, formulation="dense"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.block_size, self.top_k, self.formulation = block_size, top_k, formulation
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, N, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, N, self.kv_heads, self.head_dim)
        bs = self.block_size if self.block_size is not None else max(1, N // 4)
        if self.formulation == "bnhd":
            return self.o_proj(moba_bnhd(q, k, v, bs, self.top_k).reshape(B, N, -1))
        o = FORMULATIONS[self.formulation](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bs, self.top_k)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    """A pre-norm transformer block: MoBA attention + MLP, residuals."""

    def __init__(self, d=64, heads=4, kv_heads=2, block_size=16, top_k=3, formulation="dense"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = MobaAttention(d, heads, kv_heads, block_size, top_k, formulation)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def moba_varlen_loop(q, k, v, cu_seqlens, block_size: int, top_k: int):
    """Packed ``[S, H, D]`` sequences (one per ``cu_seqlens`` interval), a Python loop over them: slice means
    per block, einsum gate with the own block forced and future blocks masked, top-k, dense masked softmax."""
    out = torch.zeros_like(q)
    for i in range(cu_seqlens.numel() - 1):
        a, b = cu_seqlens[i].item(), cu_seqlens[i + 1].item()
        qs, ks, vs = q[a:b].float(), k[a:b].float(), v[a:b].float()
        n = b - a
        if n == 0:                                                  # an empty sequence
            continue
        nb = math.ceil(n / block_size)
        means = torch.cat([ks[j * block_size:min(n, (j + 1) * block_size)].mean(0, keepdim=True) for j in range(nb)])
        gate = torch.einsum("shd,nhd->hsn", qs, means)
        for j in range(nb):
            gate[:, : (j + 1) * block_size, j] = float("-inf")
            gate[:, j * block_size:(j + 1) * block_size, j] = float("inf")
        idx = torch.topk(gate, k=min(top_k, nb), dim=-1).indices
        keep = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, idx, True) & (gate > float("-inf"))
        mask = torch.where(keep, 0.0, float("-inf")).repeat_interleave(block_size, -1)[:, :, :n]
        mask = mask.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        s = torch.einsum("xhd,yhd->hxy", qs, ks) / math.sqrt(q.shape[-1]) + mask
        out[a:b] = torch.einsum("hxy,yhd->xhd", s.softmax(-1), vs).to(q.dtype)
    return out


class VarlenLoopMoba(nn.Module):
    """`moba_varlen_loop` as a module: ``forward(q, k, v, cu_seqlens)`` on packed ``[S, H, D]`` tensors."""

    def __init__(self, block_size: int = 8, top_k: int = 3):
        super().__init__()
        self.block_size, self.top_k = block_size, top_k

    def forward(self, q, k, v, cu_seqlens):
        return moba_varlen_loop(q, k, v, cu_seqlens, self.block_size, self.top_k)


def moba_varlen_naive(q, k, v, cu_seqlens, max_seqlen: int, chunk_size: int, topk: int):
    """Packed ``[S, H, D]`` sequences the way MoBA's reference implementation is written: per sequence, chunk
    means gathered in a list, an fp32 gate, future chunks masked and the own chunk forced by in-place writes,
    a threshold at the k-th largest gate value intersected with the ``topk`` indices (ties), the selection
    turned into an additive ``0 / -inf`` mask, fp32 attention accumulated into a view of the output."""
    scale = q.shape[-1] ** -0.5
    o = torch.zeros_like(q)
    for seq in range(cu_seqlens.numel() - 1):
        start, end = cu_seqlens[seq].item(), cu_seqlens[seq + 1].item()
        q_, k_, v_, o_ = q[start:end], k[start:end], v[start:end], o[start:end]
        length = end - start
        n_chunks = math.ceil(length / chunk_size)
        means = []
        for c in range(n_chunks):
            lo, hi = c * chunk_size, min(length, (c + 1) * chunk_size)
            means.append(k_[lo:hi].mean(dim=0, keepdim=True))
        means = torch.cat(means, dim=0)                                         # [chunks, H, D]
        gate = torch.einsum("shd,nhd->hsn", q_.type(torch.float32), means.type(torch.float32))
        for c in range(n_chunks):
            gate[:, : (c + 1) * chunk_size, c] = float("-inf")
            gate[:, c * chunk_size:(c + 1) * chunk_size, c] = float("inf")
        top_val, top_idx = torch.topk(gate, k=min(topk, n_chunks), dim=-1, largest=True, sorted=False)
        threshold, _ = top_val.min(dim=-1)
        attend = gate >= threshold.unsqueeze(-1)
        picked = torch.zeros(attend.shape, dtype=torch.bool, device=q.device).scatter_(dim=-1, index=top_idx, value=True)
        attend = torch.logical_and(attend, picked)
        gate[attend] = 0
        gate[~attend] = -float("inf")
        gate = gate.repeat_interleave(chunk_size, dim=-1)[:, :, :length]        # [H, S, S]
        gate.masked_fill_(torch.ones_like(gate, dtype=torch.bool).tril().logical_not(), -float("inf"))
        qk = torch.einsum("xhd,yhd->hxy", q_.type(torch.float32), k_.type(torch.float32))
        qk += gate
        p = torch.softmax(qk * scale, dim=-1)
        o_ += torch.einsum("hxy,yhd->xhd", p, v_.type(torch.float32))
        o = o.type_as(q)
    return o


class VarlenNaiveMoba(nn.Module):
    """`moba_varlen_naive` as a module: ``forward(q, k, v, cu_seqlens, max_seqlen)``."""

    def __init__(self, chunk_size: int = 8, topk: int = 3):
        super().__init__()
        self.chunk_size, self.topk = chunk_size, topk

    def forward(self, q, k, v, cu_seqlens, max_seqlen):
        return moba_varlen_naive(q, k, v, cu_seqlens, max_seqlen, self.chunk_size, self.topk)


class PackedMobaAttention(nn.Module):
    """Attention that packs a ``[B, N, d]`` batch into ``[B*N, H, D]`` sequences with ``cu_seqlens`` made from
    the shapes (``torch.arange(0, (B + 1) * N, N)``) and calls `moba_varlen_naive`, as MoBA's wrapper does."""

    def __init__(self, d=32, heads=4, chunk_size=8, topk=3):
        super().__init__()
        self.heads, self.head_dim, self.chunk_size, self.topk = heads, d // heads, chunk_size, topk
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B * N, 3, self.heads, self.head_dim).unbind(1)
        cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=x.device)
        o = moba_varlen_naive(q, k, v, cu, N, self.chunk_size, self.topk)
        return self.o_proj(o.reshape(B, N, d))
