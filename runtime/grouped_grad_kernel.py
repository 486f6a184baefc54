"""The grouped GEMMs of an MoE layer's backward, in one launch each (forward: `grouped_gemm_kernel`).

Two templates, their variants ``tl.constexpr`` flags:

- ``templates/grouped_dgrad.py.jinja`` (`GroupedDgradParams`): ``A @ W[e]^T`` over expert-sorted rows with
  ``W`` the forward's weight read through strides (its transpose, no copy). Variants: the gather prologue
  (row ``r`` reads ``A[order[r] // k]``: the output gradient, never permuted in memory); a second product
  summed into the accumulator (``d x = d gate @ W_gate + d up @ W_up``); the activation's backward as
  epilogue (``act_grad``: reads the pre-activation gate/up, writes ``d gate``/``d up`` scaled by the routing
  weight, ``h`` for the down projection's weight gradient, and per-N-tile partial dots ``sum_n dh * h`` from
  which the routing weight's gradient is summed); the scatter epilogue (row ``r`` stored at ``order[r]``).
- ``templates/grouped_wgrad.py.jinja`` (`GroupedWgradParams`): ``out[e] = sum_r A[r]^T B[r]`` over expert
  ``e``'s rows (a different count per expert), gathered and routing-weight-scaled prologues, the bias
  gradient (column sums) on the side. One program per (expert, N tile, K tile): deterministic.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moec.ir.tiles import GemmTile, bucket_suffix, bucket_text
from moec.spec import ACTIVATIONS, GLU_PLAIN, check_glu_variant, glu_fields

from .grouped_gemm_kernel import ACTIVATION_EXPR, _one_line, check_gemm_tile, expert_weight, grid_rows, tanh_expr
from .launch import Kernel, cdiv, next_pow2
from .render import render

# d act(x) / dx as a Triton expression of the fp32 tile ``x`` (torch's formulas: tests compare with autograd)
DACTIVATION_EXPR = {
    "silu": "(1.0 / (1.0 + tl.exp(-x))) * (1.0 + x * (1.0 - 1.0 / (1.0 + tl.exp(-x))))",
    "gelu": "0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)",
    # gelu_tanh(x) = x * s with s = sigmoid(2 y), y = 0.79788456 (x + 0.044715 x^3)
    "gelu_tanh": "(1.0 / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))) * (1.0 + x * "
                 "(1.0 - 1.0 / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))) * "
                 "1.5957691216057308 * (1.0 + 0.134145 * x * x))",
    "relu": "tl.where(x > 0.0, 1.0, 0.0)",
    "relu2": "2.0 * tl.maximum(x, 0.0)",
}
assert set(DACTIVATION_EXPR) == set(ACTIVATIONS)

DGRAD_ARGS = ("a_ptr", "w_ptr", "a2_ptr", "w2_ptr", "out_ptr", "out2_ptr", "h_ptr", "dot_ptr", "gate_ptr", "up_ptr",
              "offsets_ptr", "order_ptr", "scale_ptr", "M", "ROW_TILES",
              "stride_am", "stride_ak", "stride_we", "stride_wn", "stride_wk",
              "stride_a2m", "stride_a2k", "stride_w2e", "stride_w2n", "stride_w2k",
              "stride_om", "stride_on", "stride_gm", "stride_gn", "stride_dm")
WGRAD_ARGS = ("a_ptr", "b_ptr", "out_ptr", "dbias_ptr", "offsets_ptr", "order_ptr", "scale_ptr", "M",
              "stride_am", "stride_an", "stride_bm", "stride_bk", "stride_oe", "stride_on", "stride_ok",
              "stride_de", "stride_dn")


def act_grad_exprs(activation: str, act_alpha: float = 1.0, glu_limit: Optional[float] = None,
                   up_shift: float = 0.0, gate_softcap: Optional[float] = None,
                   up_softcap: Optional[float] = None) -> dict:
    """Triton expressions of the activation's backward epilogue: the clamped gate ``gate_expr`` (from the
    loaded ``acc_g``), ``activation_expr`` and ``dactivation_expr`` (of ``x``), the up operand ``up_expr``
    (from ``acc_up``), and ``gate_pass``/``up_pass``: 1 where the clamp passes the gradient, as torch's
    ``clamp`` does (inside the bounds, bounds included), else 0."""
    act, dact = ACTIVATION_EXPR[activation], DACTIVATION_EXPR[activation]
    if act_alpha != 1.0:
        a = repr(act_alpha)
        act = f"x / (1.0 + tl.exp(-{a} * x))"
        dact = f"(1.0 / (1.0 + tl.exp(-{a} * x))) * (1.0 + {a} * x * (1.0 - 1.0 / (1.0 + tl.exp(-{a} * x))))"
    gate, up, gate_pass, up_pass = "acc_g", "acc_up", "1.0", "1.0"
    if glu_limit is not None:
        lim = repr(float(glu_limit))
        gate = f"tl.where(acc_g > {lim}, {lim}, acc_g)"
        up = f"tl.where(acc_up > {lim}, {lim}, tl.where(acc_up < -{lim}, -{lim}, acc_up))"
        gate_pass = f"tl.where(acc_g > {lim}, 0.0, 1.0)"
        up_pass = f"tl.where((acc_up > {lim}) | (acc_up < -{lim}), 0.0, 1.0)"
    if gate_softcap is not None:
        # act(x) = s(x) * sig(a x), s(x) = c tanh(x / c): act' = (1 - tanh^2) sig + s a sig (1 - sig)
        a, c = repr(float(act_alpha)), repr(float(gate_softcap))
        t, sig = tanh_expr(f"x / {c}"), f"(1.0 / (1.0 + tl.exp(-{a} * x)))"
        act = f"({c} * {t} * {sig})"
        dact = f"((1.0 - {t} * {t}) * {sig} + {c} * {t} * {a} * {sig} * (1.0 - {sig}))"
    if up_softcap is not None:          # d softcap(u) / du = 1 - tanh(u / c)^2, of the clamped u
        c = repr(float(up_softcap))
        t = tanh_expr(f"({up}) / {c}")
        up = f"({c} * {t})"
        up_pass = f"({up_pass}) * (1.0 - {t} * {t})"
    if up_shift != 0.0:
        up = f"({up}) + {float(up_shift)!r}"
    return {"gate_expr": gate, "activation_expr": act, "dactivation_expr": dact, "up_expr": up,
            "gate_pass": gate_pass, "up_pass": up_pass}


@dataclass(frozen=True)
class GroupedDgradParams:
    num_experts: int
    n: int                              # output features N (the forward's K)
    k_dim: int                          # reduction K (the forward's N)
    gather_top_k: int = 0               # > 0: row r reads a[order[r] // gather_top_k]
    two: bool = False                   # + a2 @ w2^T
    act_grad: bool = False              # the activation's backward epilogue
    activation: Optional[str] = None
    glu: bool = False
    act_alpha: float = 1.0
    glu_limit: Optional[float] = None
    up_shift: float = 0.0
    gate_softcap: Optional[float] = None
    up_softcap: Optional[float] = None
    scale: bool = False                 # act_grad: d h times the routing weight (scale[order[r]] / scale[r])
    scale_in: bool = False              # ... or the weight scaled the activation's inputs (d gate, d up and dots
                                        # of experts whose input it scales)
    store_h: bool = False               # act_grad: write h
    scatter: bool = False               # not act_grad: row r stored at out[order[r]]
    out_dtype: torch.dtype = torch.float32
    tile: GemmTile = GemmTile(16, 32, 32)
    header: str = ""
    bucket: tuple = ()

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.n < 1 or self.k_dim < 1:
            raise ValueError(f"num_experts, n, k_dim must be positive: {self}")
        if self.act_grad:
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"act_grad needs an activation from {ACTIVATIONS}, got {self.activation!r}")
            if self.two or self.scatter:
                raise ValueError("act_grad goes with neither two nor scatter")
            check_glu_variant(self.activation, self.glu, **self.variant)
        elif self.glu or self.scale or self.store_h or self.activation is not None:
            raise ValueError("glu, scale, store_h and activation belong to act_grad")
        if self.scale_in and not self.scale:
            raise ValueError("scale_in needs scale (it says where the scale applies)")
        if self.gather_top_k < 0:
            raise ValueError(f"gather_top_k must be >= 0, got {self.gather_top_k}")
        check_gemm_tile(self.tile)

    @property
    def routed(self) -> bool:
        return self.gather_top_k > 0 or self.scatter

    @property
    def variant(self) -> dict:
        """The GLU variant's fields (`moec.spec.GLU_PLAIN`'s keys)."""
        return glu_fields(self)

    def fn_name(self) -> str:
        parts = ["grouped_dgrad"]
        if self.gather_top_k:
            parts.append("gather")
        if self.two:
            parts.append("two")
        if self.act_grad:
            parts += [self.activation] + (["glu"] if self.glu else [])
            if self.variant != GLU_PLAIN:
                parts.append("variant")
            if self.scale_in:
                parts.append("inscaled")
        if self.scatter:
            parts.append("scatter")
        if self.bucket:
            parts.append(bucket_suffix(*self.bucket))
        return "_".join(parts)


@functools.lru_cache(maxsize=None)
def render_grouped_dgrad(params: GroupedDgradParams) -> Kernel:
    name = params.fn_name()
    exprs = act_grad_exprs(params.activation, **params.variant) \
        if params.act_grad else dict.fromkeys(("gate_expr", "activation_expr", "dactivation_expr", "up_expr",
                                               "gate_pass", "up_pass"), "0.0")
    source = render("grouped_dgrad.py.jinja", fn_name=name, header=_one_line(params.header),
                    num_experts=params.num_experts, n=params.n, k_dim=params.k_dim,
                    gather_top_k=params.gather_top_k, two=params.two, act_grad=params.act_grad,
                    activation=params.activation, glu=params.glu, scale=params.scale, scale_in=params.scale_in,
                    store_h=params.store_h,
                    scatter=params.scatter, out_dtype=str(params.out_dtype).replace("torch.", ""),
                    tile=params.tile, bucket=bucket_text(*params.bucket) if params.bucket else "every T", **exprs)
    return Kernel(source, name, DGRAD_ARGS)


def grouped_dgrad(a: Tensor, w: Tensor, params: GroupedDgradParams, *, out: Tensor,
                  offsets: Optional[Tensor] = None, order: Optional[Tensor] = None,
                  a2: Optional[Tensor] = None, w2: Optional[Tensor] = None,
                  gate: Optional[Tensor] = None, up: Optional[Tensor] = None, out2: Optional[Tensor] = None,
                  h: Optional[Tensor] = None, dots: Optional[Tensor] = None,
                  scale_vec: Optional[Tensor] = None) -> Tensor:
    """Run the backward grouped GEMM; returns ``out``.

    ``a``: ``[T, K]`` token rows (gather) or ``[M, K]`` sorted rows; ``w``, ``w2``: ``[E, N, K]`` views
    (e.g. ``w_down.transpose(1, 2)``); ``a2 [M, K]`` with ``two``. With ``act_grad``: ``gate`` (and ``up``
    with glu) ``[M, N]`` pre-activation rows, ``out`` (d gate) and ``out2`` (d up) ``[M, N]``, ``h [M, N]``
    with ``store_h``, ``dots`` fp32 ``[P, >= cdiv(N, BLOCK_N)]`` (column ``j`` for N tile ``j``; row ``order[r]`` when routed, else ``r``;
    rows of dropped pairs untouched), ``scale_vec`` as in the forward. ``offsets``/``order`` from dispatch
    (None: one dense expert over ``M = a.shape[0]`` rows)."""
    E, N, K = params.num_experts, params.n, params.k_dim
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"a must be [rows, K={K}], got {tuple(a.shape)}")
    w = expert_weight(w, params, "w")
    if params.two:
        if a2 is None or w2 is None:
            raise ValueError("params.two needs a2 and w2")
        w2 = expert_weight(w2, params, "w2")
    if offsets is None:
        if params.routed or E != 1:
            raise ValueError("the dense case (offsets=None) has one expert and no gather/scatter")
        M = a.shape[0]
    else:
        if tuple(offsets.shape) != (E + 1,) or offsets.dtype != torch.int32:
            raise ValueError(f"offsets must be int32 [E+1={E + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
        M = order.shape[0] if params.routed else a.shape[0]
    if params.gather_top_k and M != a.shape[0] * params.gather_top_k:
        raise ValueError(f"gather: order has {M} pairs, a has {a.shape[0]} rows x top_k {params.gather_top_k}")
    if tuple(out.shape) != (M, N) or out.dtype != params.out_dtype:
        raise ValueError(f"out must be {params.out_dtype} [{M}, {N}], got {out.dtype} {tuple(out.shape)}")
    tile = params.tile
    tiles_n = cdiv(N, tile.block_n)
    if params.act_grad:
        for t, what in ((gate, "gate"), (up if params.glu else gate, "up"), (out2 if params.glu else out, "out2"),
                        (h if params.store_h else out, "h")):
            if t is None or tuple(t.shape) != (M, N):
                raise ValueError(f"act_grad needs {what} [{M}, {N}]")
        if params.glu and up.stride() != gate.stride():
            raise ValueError("gate and up must have the same strides")
        for t in (out2, h):
            if t is not None and t.stride() != out.stride():
                raise ValueError("out2 and h must have out's strides")
        if dots is None or dots.dtype != torch.float32 or dots.shape[1] < tiles_n or dots.stride(1) != 1:
            raise ValueError(f"act_grad needs dots: fp32 [P, >= {tiles_n}] with unit column stride")
        if params.scale and scale_vec is None:
            raise ValueError("params.scale needs scale_vec")
    row_tiles = grid_rows(params, M, offsets is not None)
    order_arg = order.contiguous() if (order is not None and params.routed) else None
    w2_ = w2 if w2 is not None else w
    a2_ = a2 if a2 is not None else a
    g_ = gate if gate is not None else out
    args = dict(zip(DGRAD_ARGS, (
        a, w, a2, w2, out, out2, h, dots, gate, up, offsets, order_arg,
        scale_vec.reshape(-1) if scale_vec is not None else None, M, row_tiles,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        a2_.stride(0), a2_.stride(1), w2_.stride(0), w2_.stride(1), w2_.stride(2),
        out.stride(0), out.stride(1), g_.stride(0), g_.stride(1), dots.stride(0) if dots is not None else 0)))
    constexprs = dict(N=N, K=K, NUM_EXPERTS=E, E_PAD=max(2, next_pow2(E)), HAS_OFFSETS=offsets is not None,
                      GATHER_TOP_K=params.gather_top_k, SCATTER=params.scatter, SCALE=params.scale,
                      SCALE_IN=params.scale_in, TWO=params.two, ACT_GRAD=params.act_grad, GLU=params.glu,
                      STORE_H=params.store_h,
                      BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m)
    render_grouped_dgrad(params)((row_tiles * tiles_n,), args, constexprs,
                                 num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


@dataclass(frozen=True)
class GroupedWgradParams:
    num_experts: int
    n: int                              # rows of each expert's gradient (A's columns)
    k_dim: int                          # its columns (B's columns)
    gather_a: int = 0                   # > 0: A row order[r] // gather_a
    gather_b: int = 0
    scale: bool = False                 # A's row r times scale[order[r]] (scale[r] without offsets)
    dbias: bool = False                 # also the column sums of A per expert
    out_dtype: torch.dtype = torch.float32
    tile: GemmTile = GemmTile(16, 32, 32)
    header: str = ""
    bucket: tuple = ()

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.n < 1 or self.k_dim < 1:
            raise ValueError(f"num_experts, n, k_dim must be positive: {self}")
        if self.gather_a < 0 or self.gather_b < 0:
            raise ValueError("gather_a and gather_b must be >= 0")
        check_gemm_tile(self.tile)

    def fn_name(self) -> str:
        parts = ["grouped_wgrad"]
        if self.gather_a or self.gather_b:
            parts.append("gather")
        if self.scale:
            parts.append("scaled")
        if self.dbias:
            parts.append("dbias")
        if self.bucket:
            parts.append(bucket_suffix(*self.bucket))
        return "_".join(parts)


@functools.lru_cache(maxsize=None)
def render_grouped_wgrad(params: GroupedWgradParams) -> Kernel:
    name = params.fn_name()
    source = render("grouped_wgrad.py.jinja", fn_name=name, header=_one_line(params.header),
                    num_experts=params.num_experts, n=params.n, k_dim=params.k_dim, gather_a=params.gather_a,
                    gather_b=params.gather_b, scale=params.scale, dbias=params.dbias,
                    out_dtype=str(params.out_dtype).replace("torch.", ""), tile=params.tile,
                    bucket=bucket_text(*params.bucket) if params.bucket else "every T")
    return Kernel(source, name, WGRAD_ARGS)


def grouped_wgrad(a: Tensor, b: Tensor, params: GroupedWgradParams, *, out: Tensor,
                  offsets: Optional[Tensor] = None, order: Optional[Tensor] = None,
                  scale_vec: Optional[Tensor] = None, dbias: Optional[Tensor] = None) -> Tensor:
    """``out[e] = sum over expert e's rows r of a[row_a(r)]^T b[row_b(r)]`` (``[E, N, K]``, any strides:
    e.g. a view of the parameter's ``.grad`` layout); ``dbias [E, N]`` the column sums of ``a`` with
    ``params.dbias``. ``a``: ``[T, N]`` token rows (``gather_a``) or ``[M, N]``; ``b`` likewise with ``K``
    columns. ``offsets``/``order`` from dispatch; None: one expert over every row of ``a``."""
    E, N, K = params.num_experts, params.n, params.k_dim
    if a.dim() != 2 or a.shape[1] != N or b.dim() != 2 or b.shape[1] != K:
        raise ValueError(f"a must be [rows, N={N}] and b [rows, K={K}], got {tuple(a.shape)}, {tuple(b.shape)}")
    out = expert_weight(out, params, "out")
    if out.dtype != params.out_dtype:
        raise ValueError(f"out is {out.dtype}, params.out_dtype is {params.out_dtype}")
    if offsets is None:
        if E != 1 or params.gather_a or params.gather_b:
            raise ValueError("the dense case (offsets=None) has one expert and no gather")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"a and b must have as many rows, got {a.shape[0]} and {b.shape[0]}")
    elif tuple(offsets.shape) != (E + 1,) or offsets.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 [E+1={E + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    elif order is None and (params.gather_a or params.gather_b or params.scale):
        raise ValueError("gather and scale need order from dispatch")
    if params.scale and scale_vec is None:
        raise ValueError("params.scale needs scale_vec")
    if params.dbias:
        dbias = dbias.unsqueeze(0) if dbias is not None and dbias.dim() == 1 and E == 1 else dbias
        if dbias is None or tuple(dbias.shape) != (E, N):
            raise ValueError(f"params.dbias needs dbias [E={E}, N={N}]")
    tile = params.tile
    ds = dbias.stride() if dbias is not None else (0, 0)
    args = dict(zip(WGRAD_ARGS, (
        a, b, out, dbias, offsets, order.contiguous() if order is not None else None,
        scale_vec.reshape(-1) if scale_vec is not None else None, a.shape[0] if offsets is None else 0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out.stride(), *ds)))
    constexprs = dict(N=N, K=K, HAS_OFFSETS=offsets is not None, GATHER_A=params.gather_a, GATHER_B=params.gather_b,
                      SCALE=params.scale, DBIAS=params.dbias,
                      BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    grid = (E * cdiv(N, tile.block_n) * cdiv(K, tile.block_k),)
    render_grouped_wgrad(params)(grid, args, constexprs, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out
