"""The MoBA block-sparse attention backward: ``(q, k, v, indices, d out, lse, delta) -> (d q, d k, d v)``.

Two kernels, for both forward schemes (they compute the same attention), no host synchronisation:

- ``templates/moba_bwd_dq.py.jinja`` (`moba_dq`): query-tile-major like the rows forward: each program
  walks the union of the blocks its rows selected and accumulates ``d q`` on chip;
- ``templates/moba_bwd_dkdv.py.jinja`` (`moba_dkdv`): key-block-major, FlashMoBA's densified backward:
  each program owns BLOCK_N keys of one block and one kv head, visits the block's own queries (causal)
  and the gathered rows of the queries of later blocks that selected it (CSR lists per key block,
  `moec.runtime.moba_collect.collect_block_queries`), and writes its ``d k``, ``d v`` rows once.

``delta = rowsum(d out * out) - d lse`` (`attention_delta`) folds the log-sum-exp output's gradient in:
``d s = p * (d p - delta)``. Probabilities are recomputed from the forward's lse. The gate's selection
(the indices) has no gradient, as in MoBA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from moec.ir.tiles import MobaAttentionTile, pow2

from .launch import cdiv
from .moba_collect import collect_block_queries
from .moba_kernel import MobaParams, check_indices, render_moba
from .moba_maps import bounded, query_programs, strides


@dataclass(frozen=True)
class MobaDqParams(MobaParams):
    kind: ClassVar[str] = "bwd_dq"
    template: ClassVar[str] = "moba_bwd_dq.py.jinja"

    def constexprs(self) -> dict:
        return dict(**self.shape_constexprs(), GROUP=self.group, K_PAD=pow2(self.top_k, 1),
                    BLOCK_M=self.tile.block_m, BLOCK_N=self.tile.block_n)


@dataclass(frozen=True)
class MobaDkdvParams(MobaParams):
    kind: ClassVar[str] = "bwd_dkdv"
    template: ClassVar[str] = "moba_bwd_dkdv.py.jinja"

    def constexprs(self) -> dict:
        return dict(**self.shape_constexprs(), GROUP=self.group, K_PAD=pow2(self.top_k, 1),
                    BLOCK_M=self.tile.block_m, BLOCK_N=self.tile.block_n,
                    CHUNKS=cdiv(self.block_size, self.tile.block_n))


def attention_delta(out: Tensor, d_out: Tensor, d_lse: Optional[Tensor] = None) -> Tensor:
    """``rowsum(d out * out) - d lse`` in fp32, ``[B, H, N]`` (d lse None: zero)."""
    delta = (d_out.float() * out.float()).sum(-1)
    return delta - d_lse.float() if d_lse is not None else delta



def _check(q, k, v, indices, d_out, lse, delta) -> None:
    B, H, N, D = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype or d_out.dtype != q.dtype:
        raise ValueError(f"q, k, v, d_out must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {d_out.dtype}")
    if tuple(d_out.shape) != (B, H, N, D) or tuple(lse.shape) != (B, H, N) or tuple(delta.shape) != (B, H, N):
        raise ValueError("d_out must be [B, H, N, D] and lse, delta [B, H, N] like q")
    check_indices(q, indices)


def moba_dq(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, d_out: Tensor, lse: Tensor, delta: Tensor, *,
            block_size: int, tile: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None, header: str = "") -> Tensor:
    """``d q [B, H, N, D]`` (q's dtype)."""
    _check(q, k, v, indices, d_out, lse, delta)
    B, H, N, D = q.shape
    cu_seqlens = bounded(cu_seqlens, N)
    params = MobaDqParams.of(q, k, indices, block_size, tile, cu_seqlens, header)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    tile_seq, tile_local, n_prog, S = query_programs(cu_seqlens, N, tile.block_m)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, idx_ptr=indices, do_ptr=d_out, lse_ptr=lse, delta_ptr=delta, dq_ptr=dq,
                cu_ptr=cu_seqlens, tile_seq_ptr=tile_seq, tile_local_ptr=tile_local, N=N, H=H, S=S,
                sm_scale=1.0 / math.sqrt(D) if D else 1.0,
                **strides(q, "q", "bhnd"), **strides(k, "k", "bhnd"), **strides(v, "v", "bhnd"),
                **strides(indices, "i", "bhnk"), **strides(d_out, "g", "bhnd"), **strides(lse, "l", "bhn"),
                **strides(delta, "e", "bhn"), **strides(dq, "o", "bhnd"))
    render_moba(params)((n_prog if N else 0, B * H), args, params.constexprs(), num_warps=tile.num_warps,
                        num_stages=tile.num_stages)
    return dq


def moba_dkdv(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, d_out: Tensor, lse: Tensor, delta: Tensor, *,
              block_size: int, tile: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None,
              header: str = "") -> tuple[Tensor, Tensor]:
    """``(d k, d v)``, ``[B, Hkv, N, D]`` each (k's dtype)."""
    _check(q, k, v, indices, d_out, lse, delta)
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    cu_seqlens = bounded(cu_seqlens, N)
    params = MobaDkdvParams.of(q, k, indices, block_size, tile, cu_seqlens, header)
    lists = collect_block_queries(indices, block_size=block_size, kv_heads=Hkv, cu_seqlens=cu_seqlens)
    start, end, local = lists.blocks or (None, None, None)
    NB = lists.n_blocks
    dk = torch.zeros((B, Hkv, N, D), dtype=k.dtype, device=k.device)
    dv = torch.zeros((B, Hkv, N, D), dtype=v.dtype, device=v.device)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, idx_ptr=indices, do_ptr=d_out, lse_ptr=lse, delta_ptr=delta,
                dk_ptr=dk, dv_ptr=dv, ent_ptr=lists.entries, off_ptr=lists.offsets, blk_start_ptr=start,
                blk_end_ptr=end, blk_local_ptr=local, N=N, H=H, HKV=Hkv, NB=NB,
                sm_scale=1.0 / math.sqrt(D) if D else 1.0,
                **strides(q, "q", "bhnd"), **strides(k, "k", "bhnd"), **strides(v, "v", "bhnd"),
                **strides(indices, "i", "bhnk"), **strides(d_out, "g", "bhnd"), **strides(lse, "l", "bhn"),
                **strides(delta, "e", "bhn"), **strides(dk, "dk", "bhnd"))
    grid = (B * Hkv * NB * cdiv(block_size, tile.block_n) if N else 0,)
    render_moba(params)(grid, args, params.constexprs(), num_warps=tile.num_warps, num_stages=tile.num_stages)
    return dk, dv
