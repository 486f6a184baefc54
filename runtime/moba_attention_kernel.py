"""The MoBA block-sparse attention forward kernel family: (q, k, v, block indices) -> (out, lse).

`moba_attention_fwd` launches ``templates/moba_attention.py.jinja`` on ``(query tiles, B*H)``
programs ("rows" scheme): each program owns BLOCK_M consecutive queries of one sequence and one
head, walks the union of the key blocks its rows selected (ascending, read from the index tile in
registers; unselected blocks are skipped), and for each computes dense ``[BLOCK_M, BLOCK_N]`` score
tiles with a row mask (rows that did not select the block) and the causal mask on the diagonal
block, under one online softmax per row: no collect step, no partials, no merge. Its work grows
with the union of the blocks a tile's rows picked, so long sequences go to the "densify" scheme
(`moba_window_kernel`: FlashMoBA's gathered tiles with window-owned softmax state); this one stays for short
sequences and decode-like shapes. The choose-moba-scheme pass picks, in the IR.

Indices are those of `moec.moba.reference.moba_block_selection` (any block numbers work: the
kernel attends to the union of the listed blocks of the query's sequence, causally; ``-1`` is
ignored), so the kernel is testable on its own against `moba_attention_from_indices`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from moec.ir.tiles import MobaAttentionTile, pow2

from .launch import LaunchPlan
from .moba_kernel import MobaParams, check_attention_inputs, render_moba
from .moba_maps import bounded, query_programs, strides

@dataclass(frozen=True)
class MobaAttentionParams(MobaParams):
    """The rows attention kernel's params (``tile``: a `MobaAttentionTile`)."""

    kind: ClassVar[str] = "attention"
    template: ClassVar[str] = "moba_attention.py.jinja"

    def constexprs(self) -> dict:
        return dict(**self.shape_constexprs(), GROUP=self.group, K_PAD=pow2(self.top_k, 1),
                    BLOCK_M=self.tile.block_m, BLOCK_N=self.tile.block_n)


def plan_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                   cu_seqlens: Optional[Tensor] = None, header: str = "") -> tuple[LaunchPlan, Tensor, Tensor]:
    """The attention's launch and its (unwritten) outputs; `moba_attention_fwd` runs it."""
    check_attention_inputs(q, k, v, indices)
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    cu_seqlens = bounded(cu_seqlens, N)
    params = MobaAttentionParams(block_size, indices.shape[3], D, H // Hkv, cu_seqlens is not None, tile,
                                 str(q.dtype).replace("torch.", ""), header)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    tile_seq, tile_local, n_prog, S = query_programs(cu_seqlens, N, params.tile.block_m)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, idx_ptr=indices, out_ptr=out, lse_ptr=lse, cu_ptr=cu_seqlens,
        tile_seq_ptr=tile_seq, tile_local_ptr=tile_local,
        N=N, H=H, S=S, sm_scale=1.0 / math.sqrt(D),
        **strides(q, "q", "bhnd"), **strides(k, "k", "bhnd"), **strides(v, "v", "bhnd"),
        **strides(indices, "i", "bhnk"), **strides(out, "o", "bhnd"), **strides(lse, "l", "bhn"),
    )
    grid = (n_prog if N else 0, B * H)
    return LaunchPlan(render_moba(params), grid, args, params.constexprs(), params.tile.num_warps,
                      params.tile.num_stages), out, lse


def moba_attention_fwd(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int,
                       tile: MobaAttentionTile, cu_seqlens: Optional[Tensor] = None,
                       header: str = "") -> tuple[Tensor, Tensor]:
    """``(out [B, H, N, D] in q's dtype, lse [B, H, N] fp32)`` of each query over the blocks
    ``indices [B, H, N, K]`` (int32) lists for it, by query tiles with row masks, with ``tile``
    (choose-tiles picks it); ``header``: the IR node's line for the kernel's header."""
    plan, out, lse = plan_attention(q, k, v, indices, block_size=block_size, tile=tile, cu_seqlens=cu_seqlens,
                                    header=header)
    plan.run()
    return out, lse
