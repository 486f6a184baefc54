"""The MoBA gate kernel family: (q, pooled keys) -> per-query block indices, top-k fused in registers.

`moba_gate(q, pooled, params)` launches ``templates/moba_gate.py.jinja`` on ``(query tiles, B*H)``
programs and returns int32 ``[B, H, N, top_k]`` (see `moec.moba.reference.moba_block_selection`
for the contract: selected blocks ascending, own block last, ``-1`` in unused slots). Each program
keeps its q tile resident, streams the pooled keys of its past blocks and merges a running
top-(k-1) per row in registers, so nothing of size N x n_blocks is ever allocated: the only
buffers are the indices and, for packed sequences, two int32 tile maps of ``cdiv(N, BLOCK_M) + S``
entries. Pooled keys come from `moec.runtime.moba_pool.pool_keys` (a torch op).
No host synchronisation: grids and buffers depend on shapes only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from moec.ir.tiles import MobaGateTile, pow2

from .launch import LaunchPlan
from .moba_kernel import FLOATS, MobaParams, render_moba
from .moba_maps import block_offsets, bounded, query_tile_map


@dataclass(frozen=True)
class MobaGateParams(MobaParams):
    """The gate kernel's params (``tile``: a `MobaGateTile`)."""

    kind: ClassVar[str] = "gate"
    template: ClassVar[str] = "moba_gate.py.jinja"

    def constexprs(self) -> dict:
        k1 = self.top_k - 1
        return dict(**self.shape_constexprs(), GROUP=self.group, K1=k1, K_PAD=pow2(self.top_k, 1),
                    K1_PAD=pow2(max(k1, 1), 1), BLOCK_M=self.tile.block_m, BLOCK_NB=self.tile.block_nb)


def gate_params(q: Tensor, k_heads: int, *, block_size: int, top_k: int, varlen: bool, tile: MobaGateTile,
                header: str = "") -> MobaGateParams:
    return MobaGateParams(block_size, top_k, q.shape[-1], q.shape[1] // k_heads, varlen, tile,
                          str(q.dtype).replace("torch.", ""), header)


def plan_gate(q: Tensor, pooled: Tensor, *, block_size: int, top_k: int, tile: MobaGateTile,
              cu_seqlens: Optional[Tensor] = None, header: str = "") -> tuple[LaunchPlan, Tensor]:
    """The gate's launch and its (unwritten) output; `moba_gate` runs it."""
    if q.dim() != 4 or pooled.dim() != 4 or pooled.shape[0] != q.shape[0] or pooled.shape[3] != q.shape[3]:
        raise ValueError(f"q [B, H, N, D] and pooled [B, Hkv, NB, D] expected, got {list(q.shape)}, "
                         f"{list(pooled.shape)}")
    if q.dtype not in FLOATS or pooled.device != q.device:
        raise ValueError(f"q must be fp32/fp16/bf16 and pooled on its device, got {q.dtype}, {pooled.device}")
    B, H, N, D = q.shape
    cu_seqlens = bounded(cu_seqlens, N)
    params = gate_params(q, pooled.shape[1], block_size=block_size, top_k=top_k,
                         varlen=cu_seqlens is not None, tile=tile, header=header)
    idx = torch.empty((B, H, N, top_k), dtype=torch.int32, device=q.device)
    bm = params.tile.block_m
    if cu_seqlens is not None:
        tile_seq, tile_local, n_prog = query_tile_map(cu_seqlens, N, bm)
        boff, _ = block_offsets(cu_seqlens, N, block_size)
        S = cu_seqlens.numel() - 1
    else:
        tile_seq = tile_local = boff = None
        n_prog, S = -(-N // bm), 1
    args = dict(
        q_ptr=q, pk_ptr=pooled, idx_ptr=idx, cu_ptr=cu_seqlens, tile_seq_ptr=tile_seq,
        tile_local_ptr=tile_local, boff_ptr=boff,
        N=N, H=H, S=S,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_pb=pooled.stride(0), stride_ph=pooled.stride(1), stride_pn=pooled.stride(2),
        stride_pd=pooled.stride(3),
        stride_ib=idx.stride(0), stride_ih=idx.stride(1), stride_in=idx.stride(2), stride_ik=idx.stride(3),
    )
    grid = (n_prog if N else 0, B * H)
    return LaunchPlan(render_moba(params), grid, args, params.constexprs(), params.tile.num_warps,
                      params.tile.num_stages), idx


def moba_gate(q: Tensor, pooled: Tensor, *, block_size: int, top_k: int, tile: MobaGateTile,
              cu_seqlens: Optional[Tensor] = None, header: str = "") -> Tensor:
    """Block indices int32 ``[B, H, N, top_k]`` for ``q [B, H, N, D]`` from ``pooled [B, Hkv, NB, D]``
    (`pool_keys`, with the same ``block_size`` and ``cu_seqlens``), with ``tile`` (choose-tiles picks it);
    ``header``: the IR node's line for the kernel's header."""
    plan, idx = plan_gate(q, pooled, block_size=block_size, top_k=top_k, tile=tile, cu_seqlens=cu_seqlens,
                          header=header)
    plan.run()
    return idx
