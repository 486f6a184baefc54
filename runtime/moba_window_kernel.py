"""The MoBA block-sparse attention forward, densify scheme: FlashMoBA's collect and densify with window
ownership, one kernel (``templates/moba_window.py.jinja``).

Same contract as `moba_attention_kernel` (the rows scheme): ``(q, k, v, indices [B, H, N, K] int32)
-> (out [B, H, N, D] in q's dtype, lse [B, H, N] fp32)``, each query attending, causally, to the union
of the blocks its row lists (``-1``, future, out-of-range and duplicate entries add nothing), one
softmax; rows with no key get out 0 and lse -inf. No host synchronisation: every buffer and grid is
sized from shapes.

One program per (window of ``tile.window`` rows of one sequence, query head, batch) keeps its rows'
online-softmax state from the first selected block to the last: each block the window's rows selected
(up to their own), ascending, by gathered dense tiles (the rows that selected it, ``tile.block_m`` at a
time, against the block's keys up to the query: causal only where it is a gathered row's own block),
then a pass over consecutive rows that normalises and writes the result. Collecting is in the kernel
(a cumsum over the window's selection per block): no sort, no per-(query, slot) partial, no merge
launch.

Memory beyond q, k, v, out and lse (`window_workspace_bytes`): the running state, fp32 ``acc [B*H*N, D]``
and ``(m, l) [B*H*N, 2]``, plus one int32 row list of ``window`` entries per program. At N = 512K,
H = 16, D = 128 that is 4.4 GB (the partials of a per-(query, slot) design would take 17.4 GB at
K = 8 in bf16). Traffic: a gathered row's state is read and written once per past block it selected
(``2 * (D + 2) * 4`` bytes), from the window's slice, which the program revisits while it is hot in
L2 (``window * (D + 2) * 4`` bytes: 132 KB for 256 rows of D = 128).
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
class MobaWindowParams(MobaParams):
    """The densify kernel's params (``tile``: a `MobaAttentionTile` with a ``window``)."""

    kind: ClassVar[str] = "window"
    template: ClassVar[str] = "moba_window.py.jinja"

    def __post_init__(self) -> None:
        super().__post_init__()
        w, bm = self.tile.window, self.tile.block_m
        if w < bm or w & (w - 1):
            raise ValueError(f"MobaAttentionTile.window must be a power of two >= block_m ({bm}), got {w}")

    def constexprs(self) -> dict:
        return dict(**self.shape_constexprs(), GROUP=self.group, K_PAD=pow2(self.top_k, 1),
                    WINDOW=self.tile.window, BLOCK_M=self.tile.block_m, BLOCK_N=self.tile.block_n)


def window_workspace_bytes(B: int, H: int, N: int, D: int, window: int, n_seqs: int = 0) -> int:
    """The bytes the densify scheme allocates beyond q, k, v, out and lse: the fp32 running state of every
    row, the row lists of every program (the module docstring's formula) and, for ``n_seqs`` packed
    sequences, the program map and the bounded ``cu_seqlens`` (under 64 bytes per program and sequence)."""
    programs = -(-N // window) + n_seqs
    maps = 64 * (programs + n_seqs + 1) if n_seqs else 0
    return B * H * N * (D + 2) * 4 + B * H * programs * window * 4 + maps


def plan_window(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                cu_seqlens: Optional[Tensor] = None, header: str = "") -> tuple[LaunchPlan, Tensor, Tensor]:
    """The densify launch and its (unwritten) ``out``, ``lse``. Works on ``meta`` tensors (AOT checks)."""
    check_attention_inputs(q, k, v, indices)
    B, H, N, D = q.shape
    cu_seqlens = bounded(cu_seqlens, N)
    params = MobaWindowParams.of(q, k, indices, block_size, tile, cu_seqlens, header)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    tile_seq, tile_local, n_prog, S = query_programs(cu_seqlens, N, tile.window)
    acc = torch.empty((B * H * N, D), dtype=torch.float32, device=q.device)
    ml = torch.empty((B * H * N, 2), dtype=torch.float32, device=q.device)
    lists = torch.empty((B * H * n_prog * tile.window,), dtype=torch.int32, device=q.device)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, idx_ptr=indices, out_ptr=out, lse_ptr=lse, cu_ptr=cu_seqlens,
        tile_seq_ptr=tile_seq, tile_local_ptr=tile_local, acc_ptr=acc, ml_ptr=ml, list_ptr=lists,
        N=N, H=H, S=S, N_PROG=n_prog, sm_scale=1.0 / math.sqrt(D) if D else 1.0,
        **strides(q, "q", "bhnd"), **strides(k, "k", "bhnd"), **strides(v, "v", "bhnd"),
        **strides(indices, "i", "bhnk"), **strides(out, "o", "bhnd"), **strides(lse, "l", "bhn"))
    plan = LaunchPlan(render_moba(params), (n_prog if N else 0, B * H), args, params.constexprs(),
                      tile.num_warps, tile.num_stages)
    return plan, out, lse


def moba_window_fwd(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_size: int, tile: MobaAttentionTile,
                    cu_seqlens: Optional[Tensor] = None, header: str = "") -> tuple[Tensor, Tensor]:
    """``(out [B, H, N, D] in q's dtype, lse [B, H, N] fp32)``, as `moba_attention_fwd`, by windows that
    own their rows' softmax (see the module docstring for the steps and the memory they take)."""
    plan, out, lse = plan_window(q, k, v, indices, block_size=block_size, tile=tile, cu_seqlens=cu_seqlens,
                                 header=header)
    plan.run()
    return out, lse
