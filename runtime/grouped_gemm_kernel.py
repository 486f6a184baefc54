"""The grouped GEMM: every expert's rows times that expert's weight, in one launch.

Rows are (token, expert) pairs grouped by expert (`moec.runtime.dispatch`). Variants, all
``tl.constexpr`` flags of the one kernel in ``templates/grouped_gemm.py.jinja``:

- gather prologue (``gather_top_k = k``): row ``r`` reads activation row ``order[r] // k``,
  so no permuted copy of the activations is ever made;
- bias epilogue: ``+ bias[e]`` (and ``+ bias_up[e]`` on the up product) before the activation;
- activation / GLU epilogue (``out = act(A @ W^T) * (A @ Wup^T)``), computed in fp32, with the GLU
  variants of `moec.spec.MoESpec` (silu slope, clamps, up shift) spelled into the expression; when
  ``W`` and ``Wup`` are the even and odd rows of one tensor (GPT-OSS's interleaved ``gate_up``), a
  launch-time flag loads both tiles at once, contiguously, instead of two stride-2 loads;
- scale epilogue: row ``r`` times ``scale_vec[order[r]]`` (routed: the flat ``[T*k]`` routing
  weights) or ``scale_vec[r]`` (dense: e.g. the shared expert's sigmoid gate);
- scatter epilogue: row ``r`` is stored at ``out[order[r]]``, i.e. back in token-major pair order
  (``p = t * k + slot``), ready for the fixed-order top-k reduce.

Which expert and rows a row tile owns: from the tile schedule (`moec.runtime.schedule_kernel`, three
loads) when one is passed, else each program scans the ``E + 1`` offsets. The routed grid is sized from M
and E only (never from the routing data): ``min(M, (M + E * (BLOCK_M - 1)) // BLOCK_M)`` row tiles, an
upper bound on ``sum_e cdiv(count_e, BLOCK_M)``; surplus programs exit at once. The grid is 1-D, row
tiles x N tiles in the tile's grouped order (`moec.ir.tiles.GemmTile.group_m`). A persistent tile
(``tile.persistent = p``) launches ``min(p * SMs, that bound)`` programs instead, each looping over the
tiles the schedule (or the scan) counts. Rows of dropped pairs (past ``offsets[E]``) are neither read nor
written: ``out`` keeps whatever it held there, and the reduce skips those pairs by their id ``-1``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moec.spec import ACTIVATIONS, GLU_PLAIN, check_glu_variant, glu_fields

from .arch import arch_of
from .launch import Kernel, Launcher, cdiv, next_pow2
from .schedule_kernel import schedule_size
from .tma import weight_descriptors
from .render import render
from moec.ir.tiles import GemmTile, bucket_suffix, bucket_text

# The epilogue's activation as a Triton expression on the fp32 tile ``x``. silu is x / (1 + exp(-x)),
# the rounding torch uses (x * tl.sigmoid(x) is off by an ulp or two); gelu_tanh is 0.5 x (1 + tanh(y))
# written the same way, as x / (1 + exp(-2 y)): Triton has no ``tl.math.tanh`` (3.6 nor 3.9).
ACTIVATION_EXPR = {
    None: "x",
    "silu": "x / (1.0 + tl.exp(-x))",
    "gelu": "0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))",
    "gelu_tanh": "x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))",
    "relu": "tl.maximum(x, 0.0)",
    "relu2": "tl.maximum(x, 0.0) * tl.maximum(x, 0.0)",
}
assert set(ACTIVATION_EXPR) == {None, *ACTIVATIONS}

ARG_NAMES = ("a_ptr", "w_ptr", "wup_ptr", "out_ptr", "pre_ptr", "pre_up_ptr", "offsets_ptr", "sched_ptr", "order_ptr",
             "scale_ptr",
             "bias_ptr", "bias_up_ptr", "M", "ROW_TILES",
             "stride_am", "stride_ak", "stride_we", "stride_wn", "stride_wk",
             "stride_ue", "stride_un", "stride_uk", "stride_om", "stride_on",
             "stride_be", "stride_bn", "stride_bue", "stride_bun")


def tanh_expr(y: str) -> str:
    """``tanh(y)`` as a Triton expression (Triton 3.6 and 3.9 have no ``tl.math.tanh``): ``1 - 2 / (1 +
    exp(2 y))``, which saturates to +-1 without overflow trouble (exp overflowing to inf gives 1), and near 0,
    where that form cancels, its series ``y - y^3/3 + 2 y^5/15`` (next term below 1e-9 relative there)."""
    return (f"tl.where(tl.abs({y}) < 0.05, ({y}) * (1.0 - ({y}) * ({y}) * (0.3333333333333333 - 0.13333333333333333 "
            f"* ({y}) * ({y}))), 1.0 - 2.0 / (1.0 + tl.exp(2.0 * ({y}))))")


def softcap_expr(x: str, cap: float) -> str:
    """``cap * tanh(x / cap)`` (Inkling2's softcap) as a Triton expression."""
    c = repr(float(cap))
    return f"({c} * {tanh_expr(f'({x}) / {c}')})"


def epilogue_exprs(activation: Optional[str], act_alpha: float = 1.0, glu_limit: Optional[float] = None,
                   up_shift: float = 0.0, gate_softcap: Optional[float] = None,
                   up_softcap: Optional[float] = None) -> dict:
    """Triton expressions of the fp32 epilogue: ``gate_expr`` (from ``acc``), ``activation_expr`` (of
    ``x``) and ``up_expr`` (from ``acc_up``). Clamps are ``tl.where`` so a NaN stays NaN, as in torch."""
    act = ACTIVATION_EXPR[activation]
    if act_alpha != 1.0:
        act = f"x / (1.0 + tl.exp(-{act_alpha!r} * x))"
    if gate_softcap is not None:        # softcap(x) * sigmoid(alpha x): the sigmoid sees the raw gate
        act = f"{softcap_expr('x', gate_softcap)} / (1.0 + tl.exp(-{float(act_alpha)!r} * x))"
    gate, up = "acc", "acc_up"
    if glu_limit is not None:
        lim = repr(float(glu_limit))
        gate = f"tl.where(acc > {lim}, {lim}, acc)"
        up = f"tl.where(acc_up > {lim}, {lim}, tl.where(acc_up < -{lim}, -{lim}, acc_up))"
    if up_softcap is not None:
        up = softcap_expr(up, up_softcap)
    if up_shift != 0.0:
        up = f"({up}) + {float(up_shift)!r}"
    return {"gate_expr": gate, "activation_expr": act, "up_expr": up}


def check_gemm_tile(t: GemmTile) -> None:
    """A grouped GEMM tile's blocks are powers of two >= 16 (what tl.dot takes)."""
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(t, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"tile.{name} must be a power of two >= 16 (tl.dot), got {v}")


@dataclass(frozen=True)
class GroupedGemmParams:
    num_experts: int                    # E (1 for a dense/shared expert)
    n: int                              # output features N
    k_dim: int                          # input features K
    activation: Optional[str] = None    # None or one of moec.spec.ACTIVATIONS
    glu: bool = False                   # out = act(A @ W^T) * (A @ Wup^T); needs activation
    bias: bool = False                  # + bias[e, n] on A @ W^T
    bias_up: bool = False               # + bias_up[e, n] on A @ Wup^T (glu)
    act_alpha: float = 1.0              # the GLU variant (moec.spec.MoESpec)
    glu_limit: Optional[float] = None
    up_shift: float = 0.0
    gate_softcap: Optional[float] = None
    up_softcap: Optional[float] = None
    gather_top_k: int = 0               # > 0: row r reads a[order[r] // gather_top_k]
    scatter: bool = False               # row r is stored at out[order[r]]
    scale: bool = False                 # row r *= scale_vec[order[r]] (routed) or scale_vec[r]
    scale_in: bool = False              # ... on the accumulators, before biases and activation (A's row scaled)
    store_pre: bool = False             # also store the activation's inputs (pre, pre_up) at out's rows
    out_dtype: torch.dtype = torch.float32
    tile: GemmTile = GemmTile(16, 32, 32)
    header: str = ""                    # the IR node's text line
    bucket: tuple = ()                  # (lo, hi): this kernel serves lo <= T <= hi; () every T
    tma: Optional[bool] = None          # weight tiles by TMA: None as MOEC_TMA says (unset: on sm90 / sm100
                                        # devices), True wherever the weights' layout allows (also the
                                        # interpreter), False never

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.n < 1 or self.k_dim < 1:
            raise ValueError(f"num_experts, n, k_dim must be positive: {self}")
        if self.activation not in ACTIVATION_EXPR:
            raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {self.activation!r}")
        if self.glu and self.activation is None:
            raise ValueError("glu needs an activation")
        if self.bias_up and not self.glu:
            raise ValueError("bias_up needs glu")
        if self.store_pre and self.activation is None:
            raise ValueError("store_pre needs an activation (pre is its input)")
        check_glu_variant(self.activation or "silu", self.glu, **self.variant)
        if self.scale_in and (not self.scale or self.store_pre):
            raise ValueError("scale_in needs scale (it says where the scale applies) and stores no pre")
        if self.gather_top_k < 0:
            raise ValueError(f"gather_top_k must be >= 0, got {self.gather_top_k}")
        check_gemm_tile(self.tile)
        if self.tile.group_m < 1:
            raise ValueError(f"tile.group_m must be >= 1, got {self.tile.group_m}")

    @property
    def routed(self) -> bool:
        return self.gather_top_k > 0 or self.scatter

    @property
    def variant(self) -> dict:
        """The GLU variant's fields (`moec.spec.GLU_PLAIN`'s keys)."""
        return glu_fields(self)

    def fn_name(self) -> str:
        parts = ["grouped_gemm"]
        if self.gather_top_k:
            parts.append("gather")
        if self.bias or self.bias_up:
            parts.append("bias")
        parts.append(self.activation or "linear")
        if self.glu:
            parts.append("glu")
        if self.variant != GLU_PLAIN:
            parts.append("variant")
        if self.scale:
            parts.append("inscaled" if self.scale_in else "scaled")
        if self.scatter:
            parts.append("scatter")
        if self.store_pre:
            parts.append("pre")
        if self.bucket:
            parts.append(bucket_suffix(*self.bucket))
        return "_".join(parts)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=None)
def render_grouped_gemm(params: GroupedGemmParams) -> Kernel:
    """The kernel for ``params`` (rendered once per distinct params)."""
    name = params.fn_name()
    source = render("grouped_gemm.py.jinja", fn_name=name, header=_one_line(params.header),
                    num_experts=params.num_experts, n=params.n, k_dim=params.k_dim,
                    activation=params.activation, glu=params.glu, gather_top_k=params.gather_top_k,
                    scatter=params.scatter, scale=params.scale, scale_in=params.scale_in,
                    store_pre=params.store_pre, out_dtype=str(params.out_dtype).replace("torch.", ""),
                    tile=params.tile,
                    bias=params.bias, bias_up=params.bias_up,
                    bucket=bucket_text(*params.bucket) if params.bucket else "every T",
                    **epilogue_exprs(params.activation, **params.variant))
    return Kernel(source, name, ARG_NAMES)


def row_tile_bound(m: int, experts: int, block_m: int, routed: bool) -> int:
    """Row tiles a grid launches for ``m`` rows of ``experts`` experts (routed) in ``block_m``-row tiles: an
    upper bound on the tiles the data can need, from the sizes alone."""
    if not routed:
        return cdiv(m, block_m)
    # sum_e cdiv(c_e, BM) <= (sum_e c_e + E (BM - 1)) // BM, and <= m (a tile holds >= 1 row)
    return min(m, (m + experts * (block_m - 1)) // block_m)


def grid_rows(params: GroupedGemmParams, m: int, routed: bool) -> int:
    """Row tiles launched for ``m`` rows (`row_tile_bound` of ``params``' experts and tile)."""
    return row_tile_bound(m, params.num_experts, params.tile.block_m, routed)


def expert_weight(w: Tensor, params, what: str) -> Tensor:
    """``w`` as ``[E, N, K]`` per ``params`` (``num_experts``, ``n``, ``k_dim``: any grouped GEMM's params)."""
    E, N, K = params.num_experts, params.n, params.k_dim
    if w.dim() == 2 and E == 1:
        w = w.unsqueeze(0)          # a dense weight [N, K]: a view
    if tuple(w.shape) != (E, N, K):
        raise ValueError(f"{what} must be [E={E}, N={N}, K={K}] (a view is fine), got {tuple(w.shape)}")
    return w


def _expert_bias(b: Optional[Tensor], wanted: bool, params: GroupedGemmParams, what: str) -> Optional[Tensor]:
    if b is None:
        if wanted:
            raise ValueError(f"params.{what} needs a {what} tensor")
        return None
    if not wanted:
        raise ValueError(f"{what} given but params.{what} is False")
    E, N = params.num_experts, params.n
    if b.dim() == 1 and E == 1:
        b = b.unsqueeze(0)
    if tuple(b.shape) != (E, N):
        raise ValueError(f"{what} must be [E={E}, N={N}] (a view is fine), got {tuple(b.shape)}")
    return b


def _interleaved(w: Tensor, w_up: Tensor) -> bool:
    """Whether ``w`` and ``w_up`` are rows ``0::2`` and ``1::2`` (dim 1) of one ``[E, 2N, K]`` tensor
    (GPT-OSS's ``gate_up_proj`` read as views): then one load fetches both tiles."""
    s = w.stride(1)
    return (w_up.shape == w.shape and w_up.stride() == w.stride() and w_up.dtype == w.dtype
            and w_up.device == w.device and s > 0 and s % 2 == 0
            and w_up.data_ptr() - w.data_ptr() == (s // 2) * w.element_size())


def bound_weights(params: GroupedGemmParams, w: Tensor, w_up: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  bias_up: Optional[Tensor] = None) -> tuple:
    """``(w, w_up, bias, bias_up)`` checked against ``params`` and viewed as ``[E, N, K]`` / ``[E, N]``."""
    w = expert_weight(w, params, "w")
    if params.glu:
        if w_up is None:
            raise ValueError("glu needs w_up")
        w_up = expert_weight(w_up, params, "w_up")
    elif w_up is not None:
        raise ValueError("w_up given but params.glu is False")
    return (w, w_up, _expert_bias(bias, params.bias, params, "bias"),
            _expert_bias(bias_up, params.bias_up, params, "bias_up"))


def grouped_gemm(a: Tensor, w: Tensor, params: GroupedGemmParams, *, out: Tensor,
                 offsets: Optional[Tensor] = None, order: Optional[Tensor] = None,
                 w_up: Optional[Tensor] = None, scale_vec: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, bias_up: Optional[Tensor] = None,
                 pre: Optional[Tensor] = None, pre_up: Optional[Tensor] = None,
                 schedule: Optional[Tensor] = None) -> Tensor:
    """Run the grouped GEMM; returns ``out``.

    - ``a [rows_a, K]``: activations, any strides. With ``gather_top_k = k`` these are the
      ``T`` token rows; otherwise the ``M`` rows in expert-sorted order (e.g. the previous
      grouped GEMM's output).
    - ``w``, ``w_up``: ``[E, N, K]`` tensors or views (strides are read; a ``[E, K, N]``
      parameter is passed as ``.transpose(1, 2)``); ``[N, K]`` is accepted when ``E == 1``.
    - ``offsets`` int32 ``[E+1]`` and ``order`` int32 ``[T*k]`` from `dispatch`. ``offsets=None``
      is the dense case: one expert over all ``M = a.shape[0]`` rows, no order.
    - ``schedule``: int32 ``[3 M + 1]``, the tile schedule of ``offsets`` for ``tile.block_m``-row tiles
      (`moec.runtime.schedule_kernel.tile_schedule`); None: each program scans the offsets.
    - ``scale_vec``: routed: the flat ``[T*k]`` routing weights indexed by pair; dense: ``[M]``.
    - ``bias``, ``bias_up``: ``[E, N]`` (any strides; ``[N]`` when ``E == 1``), with ``params.bias``
      / ``params.bias_up``.
    - ``out``: ``[M, N]`` of ``params.out_dtype``, any strides, ``M = T*k`` when routed. With
      ``scatter`` rows are pair-indexed, else sorted-row-indexed; rows of dropped pairs are
      left untouched.
    """
    E, N, K = params.num_experts, params.n, params.k_dim
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"a must be [rows, K={K}], got {tuple(a.shape)}")
    w, w_up, bias, bias_up = bound_weights(params, w, w_up, bias, bias_up)
    if out.dtype != params.out_dtype:
        raise ValueError(f"out is {out.dtype}, params.out_dtype is {params.out_dtype}")
    if offsets is None:
        if params.routed or order is not None:
            raise ValueError("gather/scatter need offsets and order from dispatch")
        if E != 1:
            raise ValueError("offsets=None is the dense case and needs num_experts == 1")
        M = a.shape[0]
    else:
        if tuple(offsets.shape) != (E + 1,) or offsets.dtype != torch.int32:
            raise ValueError(f"offsets must be int32 [E+1={E + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
        if params.routed:
            if order is None or order.dim() != 1 or order.dtype != torch.int32:
                raise ValueError("gather/scatter need order: int32 [T*k] from dispatch")
            order = order if order.is_contiguous() else order.contiguous()
            M = order.shape[0]
        else:
            M = a.shape[0]
    if params.gather_top_k and M != a.shape[0] * params.gather_top_k:
        raise ValueError(f"gather: order has {M} pairs, a has {a.shape[0]} tokens x top_k {params.gather_top_k}")
    if not params.gather_top_k and a.shape[0] != M:
        raise ValueError(f"a has {a.shape[0]} rows, expected {M}")
    if out.dim() != 2 or tuple(out.shape) != (M, N):
        raise ValueError(f"out must be [{M}, {N}], got {tuple(out.shape)}")
    if params.scale:
        if scale_vec is None:
            raise ValueError("params.scale needs scale_vec")
        scale_vec = scale_vec.reshape(-1)
        if scale_vec.shape[0] != M:
            raise ValueError(f"scale_vec must have {M} entries, got {scale_vec.shape[0]}")
    elif scale_vec is not None:
        raise ValueError("scale_vec given but params.scale is False")

    if params.store_pre:
        for t, what in ((pre, "pre"), (pre_up if params.glu else pre, "pre_up")):
            if t is None or t.shape != out.shape or t.stride() != out.stride():
                raise ValueError(f"params.store_pre needs {what} with out's shape and strides")
    elif pre is not None or pre_up is not None:
        raise ValueError("pre given but params.store_pre is False")
    if schedule is not None:
        if offsets is None:
            raise ValueError("schedule needs offsets (it is the offsets' tile schedule)")
        if schedule.dim() != 1 or schedule.dtype != torch.int32 or schedule.shape[0] != schedule_size(M):
            raise ValueError(f"schedule must be int32 [3 M + 1 = {schedule_size(M)}], got {schedule.dtype} "
                             f"{tuple(schedule.shape)}")
        if schedule.device != offsets.device:
            raise ValueError(f"schedule is on {schedule.device}, offsets on {offsets.device}")

    GroupedGemmLaunch(params, w, w_up, bias, bias_up, offsets is not None, schedule=schedule is not None)(
        a, out, offsets, order if params.routed else None, scale_vec, pre, pre_up, M, schedule)
    return out


class GroupedGemmLaunch:
    """A grouped GEMM's launch with its weights bound (checked by `grouped_gemm`, or by the program that
    binds them once: `moec.runtime.program.Bound`): the constexprs, the weights' strides and the launch
    configuration are worked out here, once; a call passes the per-call tensors and lays out the
    arguments, nothing else. ``offsets``: whether calls pass dispatch offsets (the routed / grouped case)."""

    __slots__ = ("params", "w", "w_up", "bias", "bias_up", "static", "bias_strides", "n_tiles", "launcher",
                 "a_strides", "out_strides", "programs")

    def __init__(self, params: GroupedGemmParams, w: Tensor, w_up: Optional[Tensor], bias: Optional[Tensor],
                 bias_up: Optional[Tensor], offsets: bool, a_strides: Optional[tuple] = None,
                 out_strides: Optional[tuple] = None, schedule: bool = False):
        """``a_strides`` / ``out_strides``: those of every call's ``a`` / ``out`` (and ``pre``), when the
        caller knows them (a program's own contiguous buffers); None: read at each call. ``schedule``:
        whether calls pass the offsets' tile schedule."""
        E, N, K = params.num_experts, params.n, params.k_dim
        interleaved = params.glu and _interleaved(w, w_up)
        if interleaved:     # the up operand becomes the [E, 2N, K] tensor both are rows of
            w_up = w.as_strided((E, 2 * N, K), (w.stride(0), w.stride(1) // 2, w.stride(2)))
        u = w_up if w_up is not None else w
        tma, w_arg, u_arg = weight_descriptors(params, w, w_up, interleaved)
        self.params, self.w, self.w_up, self.bias, self.bias_up = params, w_arg, u_arg, bias, bias_up
        self.a_strides, self.out_strides = a_strides, out_strides
        self.static = (w.stride(0), w.stride(1), w.stride(2), u.stride(0), u.stride(1), u.stride(2))
        bs = bias.stride() if bias is not None else (0, 0)
        bus = bias_up.stride() if bias_up is not None else (0, 0)
        self.bias_strides = (*bs, *bus)
        tile = params.tile
        self.n_tiles = cdiv(N, tile.block_n)
        # a persistent tile: its programs per SM times the device's SMs (the interpreter's "cpu": 1 SM)
        self.programs = tile.persistent * arch_of(w.device).sms if tile.persistent else 0
        constexprs = dict(N=N, K=K, NUM_EXPERTS=E, E_PAD=max(2, next_pow2(E)),
                          HAS_OFFSETS=offsets, HAS_SCHEDULE=schedule, PERSISTENT=bool(tile.persistent),
                          GATHER_TOP_K=params.gather_top_k,
                          SCATTER=params.scatter, SCALE=params.scale, SCALE_IN=params.scale_in, GLU=params.glu,
                          GLU_INTERLEAVED=interleaved,
                          HAS_BIAS=params.bias, HAS_BIAS_UP=params.bias_up, STORE_PRE=params.store_pre, W_DESC=tma,
                          BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                          GROUP_M=tile.group_m)
        self.launcher = Launcher(render_grouped_gemm(params), constexprs, tile.num_warps, tile.num_stages)

    def __call__(self, a: Tensor, out: Tensor, offsets: Optional[Tensor], order: Optional[Tensor],
                 scale_vec: Optional[Tensor], pre: Optional[Tensor], pre_up: Optional[Tensor], M: int,
                 schedule: Optional[Tensor] = None) -> None:
        """Launch over ``M`` rows (pairs when routed); ``order`` only for a routed GEMM; ``schedule`` when
        the launch was planned with one."""
        row_tiles = grid_rows(self.params, M, offsets is not None)
        tiles = row_tiles * self.n_tiles
        self.launcher((min(tiles, self.programs) if self.programs else tiles,), (
            a, self.w, self.w_up, out, pre, pre_up, offsets, schedule, order, scale_vec, self.bias, self.bias_up, M,
            row_tiles,
            *(self.a_strides or a.stride()), *self.static, *(self.out_strides or out.stride()), *self.bias_strides))
