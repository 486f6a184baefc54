"""What every MoBA kernel's params share: the shape of the problem, the tile, the header, validation
and rendering. `moba_gate_kernel`, `moba_attention_kernel`, `moba_window_kernel` and `moba_backward_kernel` subclass
`MobaParams` with their template and constexprs; `check_indices` and `check_attention_inputs` validate their
arguments."""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from moec.ir.tiles import Tile, pow2

from .launch import Kernel
from .render import render


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_indices(q, indices) -> None:
    """``indices`` must be int32 ``[B, H, N, K]`` for ``q [B, H, N, D]``."""
    B, H, N, _ = q.shape
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, N) or indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32 [B, H, N, K] = [{B}, {H}, {N}, K], got "
                         f"{indices.dtype} {list(indices.shape)}")


def check_attention_inputs(q, k, v, indices) -> None:
    """An attention forward's arguments: q, k, v of one floating dtype, indices as `check_indices` says."""
    if q.dtype not in FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_indices(q, indices)


@dataclass(frozen=True)
class MobaParams:
    """What shapes one MoBA kernel's source and launch (one rendered kernel per value)."""

    block_size: int
    top_k: int                     # index slots per query
    head_dim: int
    group: int = 1                 # query heads per kv head
    varlen: bool = False           # packed sequences (cu_seqlens)
    tile: Tile = None
    dtype: str = "float16"         # for the header only (the source is dtype-generic)
    header: str = ""               # the IR node's text line
    kind: ClassVar[str] = ""       # the kernel's name: moec_moba_<kind>_bs.._k..
    template: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.top_k < 1 or self.head_dim < 1 or self.group < 1:
            raise ValueError(f"invalid MoBA {self.kind} parameters {self}")
        for f in fields(self.tile):
            v = getattr(self.tile, f.name)
            if f.name.startswith("block") and (v < 16 or v & (v - 1)):
                raise ValueError(f"{type(self.tile).__name__}.{f.name} must be a power of two >= 16 (tl.dot), got {v}")

    @classmethod
    def of(cls, q, k, indices, block_size: int, tile, cu_seqlens, header: str = ""):
        """The params of a launch on ``q [B, H, N, D]``, ``k [B, Hkv, N, D]``, ``indices [B, H, N, K]``."""
        return cls(block_size, indices.shape[3], q.shape[3], q.shape[1] // k.shape[1], cu_seqlens is not None, tile,
                   str(q.dtype).replace("torch.", ""), header)

    @property
    def fn_name(self) -> str:
        return f"moec_moba_{self.kind}_bs{self.block_size}_k{self.top_k}" + ("_varlen" if self.varlen else "")

    def shape_constexprs(self) -> dict:
        return dict(D=self.head_dim, D_PAD=pow2(self.head_dim), BLOCK_SIZE=self.block_size, K=self.top_k,
                    VARLEN=self.varlen)


@functools.lru_cache(maxsize=None)
def render_moba(params: MobaParams) -> Kernel:
    """The kernel for ``params`` (rendered once per distinct params)."""
    source = render(params.template, fn_name=params.fn_name, head_dim=params.head_dim, top_k=params.top_k,
                    block_size=params.block_size, group=params.group, varlen=params.varlen, dtype=params.dtype,
                    tile=params.tile, header=params.header)
    return Kernel(source, params.fn_name)
