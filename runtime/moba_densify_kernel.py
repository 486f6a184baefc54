"""The MoBA block-sparse attention forward, densify scheme: FlashMoBA's "collect and densify".

Same contract as `moba_attention_kernel` (the rows scheme): ``(q, k, v, indices [B, H, N, K] int32)
-> (out [B, H, N, D] in q's dtype, lse [B, H, N] fp32)``, each query attending, causally, to the union
of the blocks its row lists (``-1``, future, out-of-range and duplicate entries add nothing), one
softmax; rows with no key get out 0 and lse -inf. Three steps, no host synchronisation (every buffer
and grid is sized from shapes):

1. **Collect** (`collect_block_queries`, torch ops on the device): each (query, slot) whose block is
   strictly before the query's own block (and not a repeat of another slot of the row) becomes an
   entry ``((b * H + h) * N + row) * K + slot``; entries are grouped by (batch, kv head, key block)
   with one stable ``torch.sort`` of int32 segment keys (so inside a list: query head, then row,
   ascending), and ``searchsorted`` gives the CSR offsets. The query heads of a GQA group share one
   list per key block: they read the same keys. Rows are sorted along K first (``-1`` first), so the
   slot an entry names is its rank in the sorted row (any unique slot per entry works: it only names
   the partial's place).
2. **Densify** (``templates/moba_densify.py.jinja``): one program per chunk of BLOCK_M entries of one
   list: gathered q rows x the block's keys, dense ``tl.dot``, online softmax, no causal mask; each
   entry writes a normalised partial out (q's dtype) and its lse (fp32) at its entry.
Steps 1 and 2 are the IR's ``densify_attention`` (`densify_partials`), step 3 its ``own_block_merge``
(`own_block_merge`); `moba_densify_fwd` runs both.

3. **Own block + merge** (``templates/moba_own_merge.py.jinja``): per query tile, the causal diagonal
   (own block) under an online softmax, then the row's K partials folded in by log-sum-exp, then out
   and lse. Fusing the own block with the merge saves writing and re-reading an own-block partial
   and one launch; partial slots never written keep lse = -inf (the buffer is filled first).

Memory (beyond q, k, v, out, lse), with ``E = B * H * N * K`` entries:

- partials: ``E * (D * q.itemsize + 4)`` bytes (out in q's dtype, lse fp32), written once, read once;
- collect: under ``E * 47`` bytes while it runs (int32 keys sorted along K, a mask, the stable sort's
  int32 keys and int64 entry ids, and its scratch), of which the int64 entries (``E * 8``) stay until
  the launch;
- maps: offsets per (batch, kv head, block) list and the chunk maps, small
  (`densify_workspace_bytes` adds it all up; a test checks it bounds what a call allocates).

At N = 512K, H = 16, K = 8, D = 128, bf16: E = 67.1M, partials 17.4 GB, collect under 3.2 GB at its peak:
with q, k, v and out (8.6 GB) well inside 80 GB. fp32 partials (``partial_dtype=torch.float32``) would
take 34.6 GB.
Traffic cost: the partials are written and read once, ``2 * E * (D * itemsize + 4)`` bytes (35 GB in the
example, about 12 ms at 3 TB/s): FlashMoBA's window ownership (row state kept in L2) is the next step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from moec.ir.tiles import MobaAttentionTile, pow2

from .launch import LaunchPlan
from .moba_kernel import MobaParams, render_moba
from .moba_maps import _row_positions, bounded, packed_blocks, query_programs, strides

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# 1. collect: per (batch, kv head, key block) the sorted list of the (query, slot) entries that picked it

@dataclass
class BlockQueryLists:
    """CSR lists: entries ``entries[offsets[s] : offsets[s + 1]]`` of segment ``s = (b * Hkv + hk) * NB + j``
    picked key block ``j`` (packed block number with ``cu_seqlens``); the entries past ``offsets[-1]``
    are padding. Programs of the densify kernel map to chunks of BLOCK_M entries through
    ``chunk_seg``/``chunk_local`` (``chunk_seg = n_seg`` for a surplus program)."""

    entries: Tensor              # int64 [E]: ((b * H + h) * N + row) * K + slot, grouped by segment
    offsets: Tensor              # int64 [n_seg + 1]
    chunk_seg: Tensor            # int32 [n_chunks]
    chunk_local: Tensor          # int32 [n_chunks]
    block_start: Optional[Tensor]  # int32 [NB]: first packed row of each block (varlen only)
    n_blocks: int                # NB: key blocks per (batch, kv head) (an upper bound with cu_seqlens)
    n_seg: int
    n_chunks: int                # grid size of the densify kernel: a static upper bound
    block_m: int


def collect_block_queries(indices: Tensor, *, block_size: int, kv_heads: int, block_m: int,
                          cu_seqlens: Optional[Tensor] = None) -> BlockQueryLists:
    """Group the selections of ``indices [B, H, N, K]`` by (batch, kv head, key block), own block and
    non-past blocks excluded. Torch ops only, no host synchronisation: sizes come from the shapes
    (the chunk grid from ``min(E, cdiv(E, block_m) + n_seg)``, which no routing can exceed)."""
    B, H, N, K = indices.shape
    dev = indices.device
    G = H // kv_heads
    bs = block_size
    seq, pos = _row_positions(N, cu_seqlens, dev)
    own = (pos // bs).to(torch.int32)                                     # c(row)
    if cu_seqlens is None:
        NB = -(-N // bs)
        row_blk0 = torch.zeros(N, dtype=torch.int32, device=dev)
        block_start = None
    else:
        boff, block_start, _, _, NB = packed_blocks(cu_seqlens, N, bs)   # first packed row of each block
        row_blk0 = boff[seq]                                              # the row's sequence's block 0
    n_seg = B * kv_heads * NB
    if n_seg + 1 >= 2**31:
        raise ValueError(f"{n_seg} (batch, kv head, block) lists do not fit int32 keys")

    # buffers of E = B*H*N*K entries are built in place and dropped as soon as used (peak memory)
    key = torch.sort(indices, dim=-1).values.contiguous()                 # -1 first; repeats adjacent
    keep = key >= 0
    keep &= key < own[:, None]                                            # strictly before the own block
    keep[..., 1:] &= key[..., 1:] != key[..., :-1]                        # a repeated block counts once
    bh = torch.arange(B * H, device=dev, dtype=torch.int32).view(B, H)
    seg0 = ((bh // H) * kv_heads + (bh % H) // G) * NB                    # (b * Hkv + hk) * NB
    key += (seg0[:, :, None] + row_blk0)[..., None]                       # the segment of each entry
    key.masked_fill_(~keep, n_seg)                                        # not a past block: sorts last
    del keep
    sorted_key, entries = torch.sort(key.view(-1), stable=True)
    E = key.numel()
    del key
    offsets = torch.searchsorted(sorted_key, torch.arange(n_seg + 1, device=dev, dtype=torch.int32))
    del sorted_key

    n_chunks = min(E, -(-E // block_m) + n_seg)
    counts = offsets[1:] - offsets[:-1]
    ends = torch.cumsum((counts + block_m - 1) // block_m, 0)
    p = torch.arange(n_chunks, device=dev)
    cseg = torch.searchsorted(ends, p, right=True)                        # first s with ends[s] > p
    start = torch.cat([ends.new_zeros(1), ends])[cseg]
    return BlockQueryLists(entries, offsets, cseg.to(torch.int32), (p - start).to(torch.int32), block_start,
                           NB, n_seg, n_chunks, block_m)


def densify_workspace_bytes(B: int, H: int, Hkv: int, N: int, D: int, K: int, block_size: int, itemsize: int,
                            *, block_m: int, n_seqs: int = 0, partial_itemsize: Optional[int] = None) -> int:
    """Upper bound of the bytes the densify scheme allocates beyond q, k, v, out and lse (the module
    docstring's formula): partials, the collect's buffers alive together at its peak, and the maps."""
    E = B * H * N * K
    NB = -(-N // block_size) + n_seqs
    n_seg = B * Hkv * NB
    partials = E * ((partial_itemsize or itemsize) * D + 4)
    # the sort along K (values 4, indices 8), a mask (1) and its temporaries (2), the keys (4), the
    # global sort's outputs (4 + 8) and, on a GPU, its scratch (about 4 + 8 + 8 more): 47 bytes an entry
    collect = E * 47
    maps = (n_seg + 1) * 8 * 3 + min(E, -(-E // block_m) + n_seg) * 8 * 4 + N * 8 * 3 + NB * 8 * 3
    return partials + collect + maps


# ----------------------------------------------------------------------------------------------
# 2 and 3. the two kernels

@dataclass(frozen=True)
class MobaDensifyParams(MobaParams):
    """The densify kernel's params (gathered past blocks; ``tile``: a `MobaAttentionTile`)."""

    kind: ClassVar[str] = "densify"
    template: ClassVar[str] = "moba_densify.py.jinja"

    def constexprs(self) -> dict:
        return dict(**self.shape_constexprs(), BLOCK_M=self.tile.block_m, BLOCK_N=self.tile.block_n)


@dataclass(frozen=True)
class MobaOwnMergeParams(MobaParams):
    """The own-block + merge kernel's params (``tile``: a `MobaAttentionTile`)."""

    kind: ClassVar[str] = "own_merge"
    template: ClassVar[str] = "moba_own_merge.py.jinja"

    def constexprs(self) -> dict:
        return dict(**self.shape_constexprs(), GROUP=self.group, K_PAD=pow2(self.top_k, 1),
                    BLOCK_M=self.tile.block_m, BLOCK_N=self.tile.block_n)


def _check(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> None:
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, _ = q.shape
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, N) or indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32 [B, H, N, K] = [{B}, {H}, {N}, K], got "
                         f"{indices.dtype} {list(indices.shape)}")



def plan_partials(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                  cu_seqlens: Optional[Tensor] = None, header: str = "",
                  partial_dtype: Optional[torch.dtype] = None) -> tuple[LaunchPlan, Tensor, Tensor]:
    """Collect (runs now: torch ops) and the densify launch, with its (unwritten) partials
    ``part_o [B*H*N*K, D]`` (``partial_dtype``, default q's) and ``part_lse [B*H*N*K]`` (filled with
    -inf: entries no program writes keep it). Works on ``meta`` tensors (AOT checks: nothing runs)."""
    _check(q, k, v, indices)
    B, H, N, D = q.shape
    Hkv, K = k.shape[1], indices.shape[3]
    cu_seqlens = bounded(cu_seqlens, N)
    params = MobaDensifyParams.of(q, k, indices, block_size, tile, cu_seqlens, header)
    E = B * H * N * K
    part_o = torch.empty((E, D), dtype=partial_dtype or q.dtype, device=q.device)
    part_lse = torch.full((E,), float("-inf"), dtype=torch.float32, device=q.device)
    lists = collect_block_queries(indices, block_size=block_size, kv_heads=Hkv, block_m=tile.block_m,
                                  cu_seqlens=cu_seqlens)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, ent_ptr=lists.entries, off_ptr=lists.offsets, chunk_seg_ptr=lists.chunk_seg,
        chunk_local_ptr=lists.chunk_local, blk_start_ptr=lists.block_start, part_o_ptr=part_o,
        part_lse_ptr=part_lse, N=N, H=H, HKV=Hkv, NB=lists.n_blocks, N_SEG=lists.n_seg,
        sm_scale=1.0 / math.sqrt(D) if D else 1.0,
        **strides(q, "q", "bhnd"), **strides(k, "k", "bhnd"), **strides(v, "v", "bhnd"))
    plan = LaunchPlan(render_moba(params), (lists.n_chunks if E else 0,), args, params.constexprs(),
                      tile.num_warps, tile.num_stages)
    return plan, part_o, part_lse


def plan_merge(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, part_o: Tensor, part_lse: Tensor, *,
               block_size: int, tile: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None,
               header: str = "") -> tuple[LaunchPlan, Tensor, Tensor]:
    """The own-block + merge launch and its (unwritten) ``out``, ``lse``."""
    _check(q, k, v, indices)
    B, H, N, D = q.shape
    cu_seqlens = bounded(cu_seqlens, N)
    params = MobaOwnMergeParams.of(q, k, indices, block_size, tile, cu_seqlens, header)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    tile_seq, tile_local, n_prog, S = query_programs(cu_seqlens, N, tile.block_m)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, idx_ptr=indices, part_o_ptr=part_o, part_lse_ptr=part_lse, out_ptr=out,
        lse_ptr=lse, cu_ptr=cu_seqlens, tile_seq_ptr=tile_seq, tile_local_ptr=tile_local,
        N=N, H=H, S=S, sm_scale=1.0 / math.sqrt(D) if D else 1.0,
        **strides(q, "q", "bhnd"), **strides(k, "k", "bhnd"), **strides(v, "v", "bhnd"),
        **strides(indices, "i", "bhnk"), **strides(out, "o", "bhnd"), **strides(lse, "l", "bhn"))
    plan = LaunchPlan(render_moba(params), (n_prog if N else 0, B * H), args, params.constexprs(),
                      tile.num_warps, tile.num_stages)
    return plan, out, lse


def densify_partials(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                     cu_seqlens: Optional[Tensor] = None, header: str = "") -> tuple[Tensor, Tensor]:
    """Steps 1 and 2 (the IR's ``densify_attention``): ``(part_o, part_lse)``."""
    plan, part_o, part_lse = plan_partials(q, k, v, indices, block_size=block_size, tile=tile,
                                           cu_seqlens=cu_seqlens, header=header)
    plan.run()
    return part_o, part_lse


def own_block_merge(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, part_o: Tensor, part_lse: Tensor, *,
                    block_size: int, tile: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None,
                    header: str = "") -> tuple[Tensor, Tensor]:
    """Step 3 (the IR's ``own_block_merge``): ``(out, lse)``."""
    plan, out, lse = plan_merge(q, k, v, indices, part_o, part_lse, block_size=block_size, tile=tile,
                                cu_seqlens=cu_seqlens, header=header)
    plan.run()
    return out, lse


def plan_densify(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                 own: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None,
                 partial_dtype: Optional[torch.dtype] = None) -> tuple[list[LaunchPlan], Tensor, Tensor]:
    """Collect (runs now) and the two launches, in order, with the (unwritten) outputs; ``tile``/``own``
    are the gather and own-block tiles. Works on ``meta`` tensors (AOT checks: nothing runs)."""
    gather, part_o, part_lse = plan_partials(q, k, v, indices, block_size=block_size, tile=tile,
                                             cu_seqlens=cu_seqlens, partial_dtype=partial_dtype)
    merge, out, lse = plan_merge(q, k, v, indices, part_o, part_lse, block_size=block_size, tile=own,
                                 cu_seqlens=cu_seqlens)
    return [gather, merge], out, lse


def moba_densify_fwd(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                     own: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None,
                     partial_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``(out [B, H, N, D] in q's dtype, lse [B, H, N] fp32)``, as `moba_attention_fwd`, by collect and
    densify (see the module docstring for the steps and the memory they take)."""
    plans, out, lse = plan_densify(q, k, v, indices, block_size=block_size, tile=tile, own=own,
                                   cu_seqlens=cu_seqlens, partial_dtype=partial_dtype)
    for plan in plans:
        plan.run()
    return out, lse
