"""The fused routing kernel family: x -> (expert ids, weights, per-expert counts) in one launch.

`render_route(params)` renders ``templates/route.py.jinja`` into a `Kernel`; `fused_route`
launches it on ``cdiv(T, BLOCK_T)`` programs. Each program computes the logits of BLOCK_T tokens
as a ``[BLOCK_T, E_PAD]`` register tile (``tl.dot`` over the hidden dim, fp32 accumulation),
then scores, selection keys, group-limited selection, top-k, weights and counts, exactly as
`moec.reference.route` does with ``capacity_factor=None`` (capacity is a later stage's job).
The logits reach global memory only when ``write_logits`` asks for them.

Outputs: ids int32 ``[T, k]`` (always in ``[0, E)``, even for NaN rows), weights fp32 ``[T, k]``,
counts int32 ``[E]`` ((token, slot) pairs per expert), and optionally ``prob_sum`` fp32 ``[E]``
(sum over tokens of the normalised scores, for the load-balancing loss), ``shared_scale`` fp32
``[T]`` (``sigmoid(x . w_shared_gate[0])``) and the fp32 ``logits`` ``[T, E]``.
No host synchronisation: every buffer is sized from T and the config.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import torch

from moec.spec import RouterConfig

from .launch import Kernel, next_pow2
from .render import render
from moec.ir.tiles import RouteTile, bucket_suffix, bucket_text

TEMPLATE = "route.py.jinja"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RouteParams:
    """Everything that shapes the routing kernel's source (one rendered kernel per value).

    ``router.order`` must be ``score_then_topk`` or ``logits_then_score`` (canonicalisation rewrites
    ``topk_then_score`` as ``score_then_topk`` + ``renormalize=True``). ``router.capacity_factor`` is ignored here.
    ``router.aux_loss`` makes the kernel also sum the normalised scores (``prob_sum``).
    """

    router: RouterConfig
    hidden: int
    shared_gate: bool = False
    write_logits: bool = False
    tile: RouteTile = RouteTile(16, 64)
    header: str = ""
    bucket: tuple = ()                  # (lo, hi): this kernel serves lo <= T <= hi; () every T

    def __post_init__(self) -> None:
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        if self.router.order not in ("score_then_topk", "logits_then_score"):
            raise ValueError(f"the routing kernel computes order='score_then_topk' or 'logits_then_score', got "
                             f"{self.router.order!r} (canonicalise topk_then_score first)")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        bt, bk = self.tile.block_t, self.tile.block_k
        for name, v in (("block_t", bt), ("block_k", bk)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"RouteTile.{name} must be a power of two >= 16 (tl.dot), got {v}")

    @property
    def e_pad(self) -> int:
        """Expert columns of the logits tile: a power of two >= 16 (tl.dot's minimum)."""
        return max(16, next_pow2(self.router.num_experts))

    @property
    def k_pad(self) -> int:
        return next_pow2(self.router.top_k)

    @property
    def block_k(self) -> int:
        """The hidden chunk actually streamed: the tile's, shrunk to the hidden size."""
        return min(self.tile.block_k, max(16, next_pow2(self.hidden)))

    @property
    def fn_name(self) -> str:
        r = self.router
        name = f"moec_route_{r.score}_e{r.num_experts}_k{r.top_k}"
        if r.n_group > 1:
            name += f"_g{r.n_group}x{r.topk_group}"
        if self.bucket:
            name += "_" + bucket_suffix(*self.bucket)
        return name

    def constexprs(self, has_noise: bool) -> dict:
        """The kernel's tl.constexpr arguments (``has_noise``: a noise tensor is given)."""
        r = self.router
        return dict(
            D=self.hidden, E=r.num_experts, E_PAD=self.e_pad, K=r.top_k, K_PAD=self.k_pad,
            SIGMOID=r.score == "sigmoid", SELECT_LOGITS=r.order == "logits_then_score",
            RENORMALIZE=r.renormalize,
            ROUTED_SCALING=float(r.routed_scaling),
            HAS_ROUTER_BIAS=r.router_bias, HAS_SCORE_BIAS=r.score_bias,
            N_GROUP=r.n_group, TOPK_GROUP=r.topk_group if r.n_group > 1 else 1,
            GROUP_TOP2=r.group_score == "top2_sum",
            HAS_NOISE=bool(has_noise), AUX=r.aux_loss, SHARED_GATE=self.shared_gate,
            WRITE_LOGITS=self.write_logits,
            BLOCK_T=self.tile.block_t, BLOCK_K=self.block_k,
        )


@dataclass
class RouteOutputs:
    ids: torch.Tensor                       # int32 [T, k]
    weights: torch.Tensor                   # fp32 [T, k]
    counts: torch.Tensor                    # int32 [E]
    prob_sum: Optional[torch.Tensor] = None      # fp32 [E] (router.aux_loss)
    shared_scale: Optional[torch.Tensor] = None  # fp32 [T] (shared_gate)
    logits: Optional[torch.Tensor] = None        # fp32 [T, E] (write_logits)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _describe(params: RouteParams) -> str:
    """The router fields the kernel computes (capacity is not one of them), for the header."""
    r = params.router
    parts = [f"score={r.score}", f"renormalize={r.renormalize}", f"routed_scaling={r.routed_scaling}",
             f"router_bias={r.router_bias}", f"score_bias={r.score_bias}"]
    if r.order == "logits_then_score":
        parts.append("top-k of the logits")
    if r.n_group > 1:
        parts.append(f"groups={r.n_group} keep {r.topk_group} by {r.group_score}")
    parts += [f"noisy={r.noisy}", f"aux_loss={r.aux_loss}", f"shared_gate={params.shared_gate}",
              f"write_logits={params.write_logits}"]
    return ", ".join(parts)


@functools.lru_cache(maxsize=None)
def render_route(params: RouteParams) -> Kernel:
    """The routing kernel for ``params`` (cached per value)."""
    source = render(TEMPLATE, fn_name=params.fn_name, header=_one_line(params.header) or "(none)",
                    hidden=params.hidden, num_experts=params.router.num_experts,
                    top_k=params.router.top_k, e_pad=params.e_pad, router=_describe(params),
                    tile=params.tile, block_k=params.block_k,
                    bucket=bucket_text(*params.bucket) if params.bucket else "every T")
    return Kernel(source, params.fn_name)


def load_balancing_loss(out: RouteOutputs, num_experts: int, num_tokens: int) -> torch.Tensor:
    """``E * sum_e (counts_e / T) * (prob_sum_e / T)`` from the kernel's outputs (0 when T = 0)."""
    if out.prob_sum is None:
        raise ValueError("the routing kernel ran without aux_loss: no prob_sum")
    T = max(num_tokens, 1)
    return num_experts * torch.sum(out.counts.float() / T * (out.prob_sum / T))


def _check(name: str, t: Optional[torch.Tensor], shape: tuple, device) -> None:
    if t is None:
        raise ValueError(f"{name} is required by this router configuration")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")


def _unexpected(name: str, t: Optional[torch.Tensor], why: str) -> None:
    if t is not None:
        raise ValueError(f"{name} was given but {why}")


def fused_route(x: torch.Tensor, w_router: torch.Tensor, params: RouteParams, *,
                b_router: Optional[torch.Tensor] = None, score_bias: Optional[torch.Tensor] = None,
                w_noise: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                w_shared_gate: Optional[torch.Tensor] = None) -> RouteOutputs:
    """Route the rows of ``x [T, d]`` (see the module docstring). ``noise`` (``[T, E]`` N(0, 1)
    draws) is added only when ``params.router.noisy`` and it is given (None: eval, no noise)."""
    r = params.router
    E, k, d = r.num_experts, r.top_k, params.hidden
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x must be [T, {d}], got {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    dev = x.device
    T = x.shape[0]
    _check("w_router", w_router, (E, d), dev)
    if r.router_bias:
        _check("b_router", b_router, (E,), dev)
    else:
        _unexpected("b_router", b_router, "router.router_bias is False")
    if r.score_bias:
        _check("score_bias", score_bias, (E,), dev)
    else:
        _unexpected("score_bias", score_bias, "router.score_bias is False")
    has_noise = noise is not None
    if has_noise:
        if not r.noisy:
            raise ValueError("noise was given but router.noisy is False")
        _check("noise", noise, (T, E), dev)
        _check("w_noise", w_noise, (E, d), dev)
    if params.shared_gate:
        _check("w_shared_gate", w_shared_gate, (1, d), dev)
    else:
        _unexpected("w_shared_gate", w_shared_gate, "params.shared_gate is False")

    ids = torch.empty((T, k), dtype=torch.int32, device=dev)
    weights = torch.empty((T, k), dtype=torch.float32, device=dev)
    counts = torch.zeros((E,), dtype=torch.int32, device=dev)
    prob_sum = torch.zeros((E,), dtype=torch.float32, device=dev) if r.aux_loss else None
    shared_scale = torch.empty((T,), dtype=torch.float32, device=dev) if params.shared_gate else None
    logits = torch.empty((T, E), dtype=torch.float32, device=dev) if params.write_logits else None
    out = RouteOutputs(ids, weights, counts, prob_sum, shared_scale, logits)
    if T == 0:
        return out

    kernel = render_route(params)
    args = dict(
        x_ptr=x, w_ptr=w_router, b_ptr=b_router if r.router_bias else None,
        sbias_ptr=score_bias if r.score_bias else None,
        wn_ptr=w_noise if has_noise else None, noise_ptr=noise if has_noise else None,
        wsg_ptr=w_shared_gate if params.shared_gate else None,
        ids_ptr=ids, wts_ptr=weights, counts_ptr=counts, psum_ptr=prob_sum,
        sscale_ptr=shared_scale, logits_ptr=logits,
        T=T,
        stride_xt=x.stride(0), stride_xd=x.stride(1),
        stride_we=w_router.stride(0), stride_wd=w_router.stride(1),
        stride_wne=w_noise.stride(0) if has_noise else 0, stride_wnd=w_noise.stride(1) if has_noise else 0,
        stride_nt=noise.stride(0) if has_noise else 0, stride_ne=noise.stride(1) if has_noise else 0,
        stride_sgd=w_shared_gate.stride(1) if params.shared_gate else 0,
    )
    grid = (-(-T // params.tile.block_t),)
    kernel(grid, args, params.constexprs(has_noise),
           num_warps=params.tile.num_warps, num_stages=params.tile.num_stages)
    return out
