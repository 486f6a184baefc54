"""The fixed-order top-k reduce: each token's k expert outputs summed in slot order.

``y_pairs [T*k, D]`` holds one row per (token, slot) pair in token-major order
(``p = t * k + slot``), as the scatter epilogue of the down-projection grouped GEMM writes it.
Rows of pairs dropped by capacity were never written; passing ``ids`` makes the reduce skip
them (``ids[t, s] == -1``), so their contents never matter. Sums are fp32, in slot order, then
the optional residual (e.g. the shared expert's output); no atomics, so results are bitwise
reproducible.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .launch import Kernel, Launcher, cdiv
from .render import render
from moec.ir.tiles import RowTile, bucket_suffix, bucket_text

ARG_NAMES = ("y_ptr", "ids_ptr", "res_ptr", "out_ptr", "T", "stride_ym", "stride_yd",
             "stride_it", "stride_is", "stride_rt", "stride_rd", "stride_ot", "stride_od")


@dataclass(frozen=True)
class ReduceParams:
    top_k: int
    hidden: int
    residual: bool = False
    out_dtype: torch.dtype = torch.float32
    tile: RowTile = RowTile(16, 64)
    header: str = ""
    bucket: tuple = ()                  # (lo, hi): this kernel serves lo <= T <= hi; () every T

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.hidden < 1:
            raise ValueError(f"top_k and hidden must be positive: {self}")
        for name in ("block_t", "block_d"):
            v = getattr(self.tile, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"tile.{name} must be a power of two, got {v}")


@functools.lru_cache(maxsize=None)
def render_reduce(params: ReduceParams) -> Kernel:
    """The kernel for ``params`` (rendered once per distinct params)."""
    name = "reduce_topk" + ("_residual" if params.residual else "")
    if params.bucket:
        name += "_" + bucket_suffix(*params.bucket)
    source = render("reduce_topk.py.jinja", fn_name=name, header=re.sub(r"\s+", " ", params.header).strip(),
                    top_k=params.top_k, hidden=params.hidden, residual=params.residual,
                    out_dtype=str(params.out_dtype).replace("torch.", ""), tile=params.tile,
                    bucket=bucket_text(*params.bucket) if params.bucket else "every T")
    return Kernel(source, name, ARG_NAMES)


def reduce_topk(y_pairs: Tensor, params: ReduceParams, *, out: Tensor, ids: Optional[Tensor] = None,
                residual: Optional[Tensor] = None) -> Tensor:
    """``out[t] = sum_s y_pairs[t*k + s] (pairs with ids[t, s] == -1 skipped) + residual[t]``; returns ``out``.

    ``y_pairs [T*k, D]``, ``ids [T, k]`` (any int dtype; None: every pair is kept),
    ``residual [T, D]`` iff ``params.residual``, ``out [T, D]`` of ``params.out_dtype``; any strides.
    """
    k, D = params.top_k, params.hidden
    if out.dim() != 2 or out.shape[1] != D:
        raise ValueError(f"out must be [T, D={D}], got {tuple(out.shape)}")
    if out.dtype != params.out_dtype:
        raise ValueError(f"out is {out.dtype}, params.out_dtype is {params.out_dtype}")
    T = out.shape[0]
    if tuple(y_pairs.shape) != (T * k, D):
        raise ValueError(f"y_pairs must be [T*k={T * k}, D={D}], got {tuple(y_pairs.shape)}")
    if ids is not None and tuple(ids.shape) != (T, k):
        raise ValueError(f"ids must be [T={T}, k={k}], got {tuple(ids.shape)}")
    if params.residual:
        if residual is None or tuple(residual.shape) != (T, D):
            raise ValueError(f"params.residual needs residual [T={T}, D={D}]")
    elif residual is not None:
        raise ValueError("residual given but params.residual is False")
    ReduceLaunch(params, ids is not None)(y_pairs, ids, residual, out, T)
    return out


class ReduceLaunch:
    """The reduce's launch worked out once per params (``ids``: whether calls pass ids): a call lays out
    the per-call tensors' arguments and launches."""

    __slots__ = ("block_t", "d_tiles", "launcher", "strides")

    def __init__(self, params: ReduceParams, ids: bool, strides: Optional[tuple] = None):
        """``strides``: the strides of every call's ``y_pairs``, ``ids``, ``residual`` and ``out``, when the
        caller knows them (a program's own contiguous buffers); None: read at each call."""
        tile = params.tile
        self.strides = strides
        self.block_t, self.d_tiles = tile.block_t, cdiv(params.hidden, tile.block_d)
        constexprs = dict(D=params.hidden, TOP_K=params.top_k, HAS_IDS=ids, HAS_RESIDUAL=params.residual,
                          BLOCK_T=tile.block_t, BLOCK_D=tile.block_d)
        self.launcher = Launcher(render_reduce(params), constexprs, tile.num_warps, tile.num_stages)

    def __call__(self, y_pairs: Tensor, ids: Optional[Tensor], residual: Optional[Tensor], out: Tensor, T: int) -> None:
        strides = self.strides or (*y_pairs.stride(), *(ids.stride() if ids is not None else (0, 0)),
                                   *(residual.stride() if residual is not None else (0, 0)), *out.stride())
        self.launcher((cdiv(T, self.block_t), self.d_tiles), (y_pairs, ids, residual, out, T, *strides))
