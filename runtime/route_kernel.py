"""The fused routing kernel family: x -> (expert ids, weights, per-expert counts) in one launch.

`render_route(params)` renders ``templates/route.py.jinja`` into a `Kernel`; `fused_route`
launches it on ``cdiv(T, BLOCK_T)`` programs. Each program computes the logits of BLOCK_T tokens
as a ``[BLOCK_T, E_PAD]`` register tile (``tl.dot`` over the hidden dim, fp32 accumulation),
then scores, selection keys, group-limited selection, top-k, weights and counts, exactly as
`moec.reference.route` does with ``capacity_factor=None`` (capacity is a later stage's job).
The logits reach global memory only when ``write_logits`` asks for them. With ``logits_in`` the
kernel is given the fp32 logits ``[T, E]`` (an external router's, `moec.spec.MoESpec.external_router`)
in place of ``x`` and reads its tile instead of computing it (``hidden`` is 0: no GEMM). With ``choices_in``
each token's k choices are given (int ``[T, k]``: a token table's rows, `moec.spec.RouterConfig.token_table`)
and weighted by their scores instead of ranked; a choice may repeat.

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

from .dispatch import dispatch as sort_by_expert
from .launch import Kernel, Launcher, next_pow2
from .render import render
from .schedule_kernel import ScheduleParams, schedule_chunk, schedule_launch
from moec.ir.tiles import RouteTile, at_bucket, bucket_suffix, bucket_text

TEMPLATE = "route.py.jinja"
ARG_NAMES = ("x_ptr", "w_ptr", "b_ptr", "sbias_ptr", "wn_ptr", "noise_ptr", "wsg_ptr", "choices_ptr", "ids_ptr",
             "wts_ptr", "counts_ptr", "psum_ptr", "sscale_ptr", "logits_ptr", "order_ptr", "offsets_ptr", "sched_ptr",
             "T", "stride_xt", "stride_xd", "stride_we", "stride_wd", "stride_wne", "stride_wnd", "stride_nt",
             "stride_ne", "stride_sgd")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RouteParams:
    """Everything that shapes the routing kernel's source (one rendered kernel per value).

    ``router.order`` must be ``score_then_topk`` or ``logits_then_score`` (canonicalisation rewrites
    ``topk_then_score`` as ``score_then_topk`` + ``renormalize=True``). ``router.capacity_factor`` is ignored here.
    ``router.aux_loss`` makes the kernel also sum the normalised scores (``prob_sum``).
    """

    router: RouterConfig
    hidden: int                         # 0 with logits_in
    shared_gate: bool = False
    write_logits: bool = False
    write_counts: bool = True           # the per-expert pair counts (the aux loss reads them)
    tile: RouteTile = RouteTile(16, 64)
    header: str = ""
    bucket: tuple = ()                  # (lo, hi): this kernel serves lo <= T <= hi; () every T
    logits_in: bool = False             # given fp32 logits [T, E] in place of x (no GEMM)
    choices_in: bool = False            # given choices int [T, k] (router.token_table), weighted not ranked

    def __post_init__(self) -> None:
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        if self.router.order not in ("score_then_topk", "logits_then_score"):
            raise ValueError(f"the routing kernel computes order='score_then_topk' or 'logits_then_score', got "
                             f"{self.router.order!r} (canonicalise topk_then_score first)")
        if self.logits_in:
            r = self.router
            if self.hidden or r.router_bias or r.noisy or self.shared_gate or self.write_logits:
                raise ValueError("a routing kernel given logits computes no GEMM: hidden=0, no router bias, noise, "
                                 "shared-expert gate or logits written")
        elif self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.choices_in != self.router.token_table:
            raise ValueError("choices_in goes with router.token_table (the choices a token table gives)")
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
        if self.logits_in:
            name += "_given"
        if self.choices_in:
            name += "_table"
        if self.bucket:
            name += "_" + bucket_suffix(*self.bucket)
        return name

    def constexprs(self, has_noise: bool) -> dict:
        """The kernel's tl.constexpr arguments (``has_noise``: a noise tensor is given)."""
        r = self.router
        return dict(
            D=self.hidden, E=r.num_experts, E_PAD=self.e_pad, K=r.top_k, K_PAD=self.k_pad,
            SIGMOID=r.score == "sigmoid", SQRT_SOFTPLUS=r.score == "sqrtsoftplus",
            SELECT_LOGITS=r.order == "logits_then_score",
            RENORMALIZE=r.renormalize,
            ROUTED_SCALING=float(r.routed_scaling),
            HAS_ROUTER_BIAS=r.router_bias, HAS_SCORE_BIAS=r.score_bias,
            N_GROUP=r.n_group, TOPK_GROUP=r.topk_group if r.n_group > 1 else 1,
            GROUP_TOP2=r.group_score == "top2_sum",
            HAS_NOISE=bool(has_noise), AUX=r.aux_loss, SHARED_GATE=self.shared_gate,
            WRITE_LOGITS=self.write_logits, WRITE_COUNTS=self.write_counts, LOGITS_IN=self.logits_in,
            CHOICES_IN=self.choices_in,
            BLOCK_T=self.tile.block_t, BLOCK_K=self.block_k,
        )


@dataclass
class RouteOutputs:
    ids: torch.Tensor                       # int32 [T, k]
    weights: torch.Tensor                   # fp32 [T, k]
    counts: Optional[torch.Tensor]          # int32 [E] (write_counts)
    prob_sum: Optional[torch.Tensor] = None      # fp32 [E] (router.aux_loss)
    shared_scale: Optional[torch.Tensor] = None  # fp32 [T] (shared_gate)
    logits: Optional[torch.Tensor] = None        # fp32 [T, E] (write_logits)
    order: Optional[torch.Tensor] = None         # int32 [T*k], offsets int32 [E+1]: as `dispatch` gives
    offsets: Optional[torch.Tensor] = None       # them (``dispatch=True``)
    schedule: Optional[torch.Tensor] = None      # int32 [3 T k + 1]: their tile schedule (``schedule=``)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _describe(params: RouteParams) -> str:
    """The router fields the kernel computes (capacity is not one of them), for the header."""
    r = params.router
    parts = [f"score={r.score}", f"renormalize={r.renormalize}", f"routed_scaling={r.routed_scaling}",
             f"router_bias={r.router_bias}", f"score_bias={r.score_bias}"]
    if r.order == "logits_then_score":
        parts.append("top-k of the logits")
    if r.token_table:
        parts.append("choices given by a token table")
    if r.n_group > 1:
        parts.append(f"groups={r.n_group} keep {r.topk_group} by {r.group_score}")
    parts += [f"noisy={r.noisy}", f"aux_loss={r.aux_loss}", f"shared_gate={params.shared_gate}",
              f"write_logits={params.write_logits}", f"write_counts={params.write_counts}"]
    return ", ".join(parts)


@functools.lru_cache(maxsize=None)
def render_route(params: RouteParams) -> Kernel:
    """The routing kernel for ``params`` (cached per value)."""
    E = params.router.num_experts
    source = render(TEMPLATE, fn_name=params.fn_name, header=_one_line(params.header) or "(none)",
                    source=f"logits [T, {E}] (given)" if params.logits_in else
                    f"x [T, {params.hidden}] -> logits [T, {E}]", num_experts=E,
                    top_k=params.router.top_k, e_pad=params.e_pad, router=_describe(params),
                    tile=params.tile, block_k=params.block_k,
                    bucket=bucket_text(*params.bucket) if params.bucket else "every T")
    return Kernel(source, params.fn_name, ARG_NAMES)


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


def check_route_weights(params: RouteParams, w_router: torch.Tensor, b_router: Optional[torch.Tensor] = None,
                        score_bias: Optional[torch.Tensor] = None, w_noise: Optional[torch.Tensor] = None,
                        w_shared_gate: Optional[torch.Tensor] = None, device=None) -> None:
    """Raise unless the router's tensors are what ``params`` needs, on ``device`` (default: the router
    weight's); ``w_noise`` is checked when given."""
    r = params.router
    E, d = r.num_experts, params.hidden
    given = [t for t in (w_router, b_router, score_bias, w_noise, w_shared_gate) if t is not None]
    dev = device if device is not None else given[0].device if given else None
    if params.logits_in:
        _unexpected("w_router", w_router, "the kernel is given the logits")
    else:
        _check("w_router", w_router, (E, d), dev)
    if r.router_bias:
        _check("b_router", b_router, (E,), dev)
    else:
        _unexpected("b_router", b_router, "router.router_bias is False")
    if r.score_bias:
        _check("score_bias", score_bias, (E,), dev)
    else:
        _unexpected("score_bias", score_bias, "router.score_bias is False")
    if w_noise is not None:
        if not r.noisy:
            raise ValueError("w_noise was given but router.noisy is False")
        _check("w_noise", w_noise, (E, d), dev)
    if params.shared_gate:
        _check("w_shared_gate", w_shared_gate, (1, d), dev)
    else:
        _unexpected("w_shared_gate", w_shared_gate, "params.shared_gate is False")


def fused_route(x: torch.Tensor, w_router: Optional[torch.Tensor], params: RouteParams, *,
                b_router: Optional[torch.Tensor] = None, score_bias: Optional[torch.Tensor] = None,
                w_noise: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                w_shared_gate: Optional[torch.Tensor] = None, dispatch: bool = False,
                schedule: Optional[dict] = None, choices: Optional[torch.Tensor] = None) -> RouteOutputs:
    """Route the rows of ``x [T, d]`` (see the module docstring). ``noise`` (``[T, E]`` N(0, 1)
    draws) is added only when ``params.router.noisy`` and it is given (None: eval, no noise).
    ``dispatch``: also group the pairs by expert (``order``, ``offsets``: `RouteLaunch`); ``schedule``
    (with dispatch): ``{bucket bound: BLOCK_M}``, also write their tile schedule for the bucket of T's
    BLOCK_M (`moec.runtime.schedule_kernel`). With ``params.logits_in``, ``x`` is the given fp32 logits
    ``[T, E]`` and ``w_router`` is None. With ``params.choices_in``, ``choices`` (int ``[T, k]``, each in
    ``[0, E)``) are the tokens' given choices."""
    r = params.router
    E, d = r.num_experts, params.hidden
    if params.logits_in and (x.dim() != 2 or x.shape[1] != E or x.dtype != torch.float32):
        raise ValueError(f"logits must be fp32 [T, {E}], got {x.dtype} {list(x.shape)}")
    if not params.logits_in and (x.dim() != 2 or x.shape[1] != d):
        raise ValueError(f"x must be [T, {d}], got {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    if noise is not None and not r.noisy:
        raise ValueError("noise was given but router.noisy is False")
    check_route_weights(params, w_router, b_router, score_bias, w_noise if noise is not None else None,
                        w_shared_gate, x.device)
    if noise is not None:
        _check("noise", noise, (x.shape[0], E), x.device)
        _check("w_noise", w_noise, (E, d), x.device)

    if schedule is not None and not dispatch:
        raise ValueError("schedule needs dispatch (it is the grouped pairs' tile schedule)")
    if params.choices_in:
        check_choices(choices, x.shape[0], r.top_k, E, x.device)
    else:
        _unexpected("choices", choices, "router.token_table is False")
    return RouteLaunch(params, w_router, b_router, score_bias, w_noise, w_shared_gate, dispatch, schedule)(
        x, noise, choices)


def check_choices(choices: Optional[torch.Tensor], T: int, k: int, E: int, device) -> None:
    """Raise unless ``choices`` are a token table's rows for T tokens: int ``[T, k]`` on ``device``, each in
    ``[0, E)`` (a check that reads them back: the compiled layer checks its table once per change instead)."""
    if choices is None:
        raise ValueError("choices are required by a token-table router")
    if choices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"choices must be int32 or int64, got {choices.dtype}")
    if tuple(choices.shape) != (T, k):
        raise ValueError(f"choices must have shape {[T, k]}, got {list(choices.shape)}")
    if choices.device != device:
        raise ValueError(f"choices are on {choices.device}, x on {device}")
    if choices.numel() and not bool(((choices >= 0) & (choices < E)).all()):
        raise ValueError(f"choices must be expert ids in [0, {E}), got values in "
                         f"[{int(choices.min())}, {int(choices.max())}]")


class RouteLaunch:
    """The routing kernel's launch with the router's weights bound (checked by `fused_route`, or once by
    the program that binds them): a call allocates the outputs and launches. ``dispatch``: the outputs
    also hold the pairs grouped by expert, sorted inside the kernel when one program holds every token
    (``T <= BLOCK_T``), after it on the device otherwise (`moec.runtime.dispatch`); ``schedule``
    (``{bucket bound: BLOCK_M}``): with them their tile schedule, written by the kernel when it sorts, by
    `moec.runtime.schedule_kernel` after the sort otherwise."""

    __slots__ = ("params", "static", "dispatch", "schedule", "_launchers", "_schedulers")

    def __init__(self, params: RouteParams, w_router: Optional[torch.Tensor], b_router: Optional[torch.Tensor] = None,
                 score_bias: Optional[torch.Tensor] = None, w_noise: Optional[torch.Tensor] = None,
                 w_shared_gate: Optional[torch.Tensor] = None, dispatch: bool = False,
                 schedule: Optional[dict] = None):
        r = params.router
        self.params, self.dispatch, self._launchers = params, dispatch, {}
        self.schedule = schedule if schedule else None
        # the schedule kernel of each bucket, for the token counts the kernel does not sort
        self._schedulers = {b: schedule_launch(ScheduleParams(r.num_experts, m, params.header))
                            for b, m in (schedule or {}).items()}
        self.static = (w_router, b_router if r.router_bias else None, score_bias if r.score_bias else None,
                       w_noise if r.noisy else None, w_shared_gate if params.shared_gate else None,
                       w_router.stride(0) if w_router is not None else 0,
                       w_router.stride(1) if w_router is not None else 0,
                       w_noise.stride(0) if w_noise is not None else 0, w_noise.stride(1) if w_noise is not None else 0,
                       w_shared_gate.stride(1) if w_shared_gate is not None else 0)

    def _launcher(self, has_noise: bool, sort: bool, sched_m: int) -> Launcher:
        got = self._launchers.get((has_noise, sort, sched_m))
        if got is None:
            p = self.params
            got = self._launchers[(has_noise, sort, sched_m)] = Launcher(
                render_route(p), {**p.constexprs(has_noise), "DISPATCH": sort, "SCHED_M": sched_m,
                                  "SCHED_S": schedule_chunk(p.e_pad)}, p.tile.num_warps, p.tile.num_stages)
        return got

    def __call__(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 choices: Optional[torch.Tensor] = None) -> RouteOutputs:
        p = self.params
        r = p.router
        E, k, dev, T = r.num_experts, r.top_k, x.device, x.shape[0]
        ids = torch.empty((T, k), dtype=torch.int32, device=dev)
        weights = torch.empty((T, k), dtype=torch.float32, device=dev)
        sort = self.dispatch and T <= p.tile.block_t
        counts = ((torch.empty if sort and T else torch.zeros)((E,), dtype=torch.int32, device=dev)   # (stored)
                  if p.write_counts else None)
        prob_sum = (torch.empty if sort and T else torch.zeros)((E,), dtype=torch.float32, device=dev) if r.aux_loss else None
        shared_scale = torch.empty((T,), dtype=torch.float32, device=dev) if p.shared_gate else None
        logits = torch.empty((T, E), dtype=torch.float32, device=dev) if p.write_logits else None
        order = torch.empty((T * k,), dtype=torch.int32, device=dev) if sort else None
        offsets = (torch.zeros if T == 0 else torch.empty)((E + 1,), dtype=torch.int32, device=dev) if sort else None
        sched_m = at_bucket(self.schedule, T) if self.schedule else 0
        sched = (torch.zeros if T == 0 else torch.empty)((3 * T * k + 1,), dtype=torch.int32, device=dev) \
            if sort and sched_m else None
        out = RouteOutputs(ids, weights, counts, prob_sum, shared_scale, logits, order, offsets, sched)
        if T == 0:
            return out
        w, b, sb, wn, wsg, swe, swd, swne, swnd, ssgd = self.static
        choices = choices.contiguous() if choices is not None else None       # (read as rows of k)
        has_noise = noise is not None
        self._launcher(has_noise, sort, sched_m if sort else 0)((-(-T // p.tile.block_t),), (
            x, w, b, sb, wn if has_noise else None, noise, wsg, choices, ids, weights, counts, prob_sum, shared_scale,
            logits,
            order, offsets, sched, T, x.stride(0), x.stride(1), swe, swd, swne if has_noise else 0, swnd if has_noise else 0,
            noise.stride(0) if has_noise else 0, noise.stride(1) if has_noise else 0, ssgd))
        if self.dispatch and not sort:
            out.order, out.offsets = sort_by_expert(ids, E)
            if sched_m:
                out.schedule = at_bucket(self._schedulers, T)(out.offsets, T * k)
        return out
