"""The expert-norm kernel: rows grouped by expert RMS-normalised by their expert's own scale (Ergo).

``y [R, D]`` holds the down projection's rows grouped by expert (``offsets [E + 1]``); each kept row
``i < offsets[E]`` becomes ``rmsnorm(y[i]) * w[e]`` (fp32 math, `moec.reference.expert_norm`). With
``scatter`` (the combine folded in) it is multiplied by its pair's routing weight and stored at row
``order[i]`` of a pair-major buffer, for the top-k reduce; without, at row ``i`` (rows past the kept pairs get
0). No host synchronisation: the kept count is read on the device.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from moec.ir.tiles import RowTile, bucket_suffix, bucket_text

from .launch import Kernel, Launcher, cdiv, next_pow2
from .render import render

ARG_NAMES = ("y_ptr", "w_ptr", "off_ptr", "order_ptr", "wts_ptr", "out_ptr", "R", "stride_ym", "stride_yd",
             "stride_we", "stride_wd", "stride_om", "stride_od")


@dataclass(frozen=True)
class ExpertNormParams:
    num_experts: int
    hidden: int
    eps: float
    scatter: bool = False
    tile: RowTile = RowTile(16, 64)
    header: str = ""
    bucket: tuple = ()                  # (lo, hi): this kernel serves lo <= T <= hi; () every T

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.hidden < 1 or not self.eps > 0:
            raise ValueError(f"num_experts and hidden must be positive, eps > 0: {self}")
        for name in ("block_t", "block_d"):
            v = getattr(self.tile, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"tile.{name} must be a power of two, got {v}")


@functools.lru_cache(maxsize=None)
def render_expert_norm(params: ExpertNormParams) -> Kernel:
    """The kernel for ``params`` (rendered once per distinct params)."""
    name = f"expert_norm_e{params.num_experts}" + ("_scatter" if params.scatter else "")
    if params.bucket:
        name += "_" + bucket_suffix(*params.bucket)
    source = render("expert_norm.py.jinja", fn_name=name, header=re.sub(r"\s+", " ", params.header).strip(),
                    hidden=params.hidden, num_experts=params.num_experts, eps=params.eps, scatter=params.scatter,
                    tile=params.tile, bucket=bucket_text(*params.bucket) if params.bucket else "every T")
    return Kernel(source, name, ARG_NAMES)


class ExpertNormLaunch:
    """The kernel's launch worked out once per params: a call lays out its tensors' arguments and launches."""

    __slots__ = ("block_t", "launcher")

    def __init__(self, params: ExpertNormParams):
        tile = params.tile
        self.block_t = tile.block_t
        constexprs = dict(D=params.hidden, E=params.num_experts, E_PAD=next_pow2(params.num_experts),
                          EPS=float(params.eps), SCATTER=params.scatter, BLOCK_T=tile.block_t,
                          BLOCK_D=tile.block_d)
        self.launcher = Launcher(render_expert_norm(params), constexprs, tile.num_warps, tile.num_stages)

    def __call__(self, y: Tensor, w: Tensor, offsets: Tensor, out: Tensor, order: Optional[Tensor] = None,
                 weights: Optional[Tensor] = None) -> None:
        R = y.shape[0]
        if R == 0:
            return
        self.launcher((cdiv(R, self.block_t),), (y, w, offsets, order, weights, out, R, *y.stride(), *w.stride(),
                                                 *out.stride()))
