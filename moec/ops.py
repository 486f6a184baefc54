"""The functional ops, registered with ``torch.library``: `moe` (``torch.ops.moec.moe``, a whole MoE
layer) and `moba_attention` (``torch.ops.moec.moba_attention``, MoBA's forward).

New model code can call them directly; ``torch.compile`` sees each as a single op (a fake
implementation gives it shapes). Each builds its IR graph through the compile driver
(`moec.compiler`, memoised per configuration, dtype and arch) and runs the generated kernels (the
Triton interpreter on a CPU); where the kernels do not apply (float64, bfloat16 on a CPU, other
devices, mixed dtypes or devices) it runs the eager reference. `moe`'s backward is generated kernels
too (``torch.ops.moec.moe_backward``, `moec.ir.backward`), registered with ``register_autograd`` so it
trains under ``torch.compile``; `moba_attention`'s too (``torch.ops.moec.moba_attention_backward``); where the kernels do not apply
both recompute the eager reference under autograd (`moec.runtime.autograd.reference_grads`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moec.ir.backward import grad_outputs, read_saved, saved_values
from moec.ir.build import moe_inputs
from moec.runtime.arch import arch_of, resolve
from moec.runtime.autograd import reference_grads
from moec.runtime.support import why_not_kernels

from . import ops_args as args
from . import reference
from .compiler import BackwardRecipe, MobaRecipe, MoERecipe, compile_program, compile_spec
from .moba import reference as moba_ref
from .moba.config import MobaConfig
from .spec import SCORES, MoESpec, MoEWeights, RouterConfig, SharedExpertConfig


def _spec_and_weights(x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down,
                      shared_gate, shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize,
                      routed_scaling, n_group, topk_group, group_score, activation, act_alpha, glu_limit,
                      up_shift):
    E, f, d = args.moe_args(x, w_router, w_up, w_down, w_gate, dict(
        b_router=b_router, score_bias=score_bias, shared_up=shared_up, shared_down=shared_down,
        shared_gate=shared_gate, shared_gate_proj=shared_gate_proj, b_gate=b_gate, b_up=b_up, b_down=b_down))
    biases = {"b_gate": b_gate, "b_up": b_up, "b_down": b_down}
    expert_bias = any(b is not None for b in biases.values())
    if expert_bias:
        want = {"b_gate": (E, f) if w_gate is not None else None, "b_up": (E, f), "b_down": (E, d)}
        for name, b in biases.items():
            if (None if b is None else tuple(b.shape)) != want[name]:
                raise ValueError(f"{name} must be {list(want[name]) if want[name] else 'None (no w_gate)'} when "
                                 f"expert biases are given, got {None if b is None else list(b.shape)}")
    router = RouterConfig(num_experts=E, top_k=top_k, score=score, renormalize=renormalize,
                          routed_scaling=routed_scaling, score_bias=score_bias is not None,
                          router_bias=b_router is not None, n_group=n_group, topk_group=topk_group,
                          group_score=group_score)
    shared = None
    if shared_up is not None:
        shared = SharedExpertConfig(width=shared_up.shape[0], gated=shared_gate_proj is not None)
    spec = MoESpec(hidden=d, ffn=f, router=router, activation=activation, glu=w_gate is not None, shared=shared,
                   expert_bias=expert_bias, act_alpha=act_alpha, glu_limit=glu_limit, up_shift=up_shift)
    w = MoEWeights(w_router=w_router, w_up=w_up, w_down=w_down, w_gate=w_gate, b_router=b_router,
                   score_bias=score_bias, shared_up=shared_up, shared_down=shared_down,
                   shared_gate=shared_gate, shared_gate_proj=shared_gate_proj, **biases)
    return spec, w


@torch.library.custom_op("moec::moe", mutates_args=())
def _moe_op(x: Tensor, w_router: Tensor, w_up: Tensor, w_down: Tensor, w_gate: Optional[Tensor],
            b_router: Optional[Tensor], score_bias: Optional[Tensor], shared_up: Optional[Tensor],
            shared_down: Optional[Tensor], shared_gate: Optional[Tensor], shared_gate_proj: Optional[Tensor],
            b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
            top_k: int, score: str, renormalize: bool, routed_scaling: float, n_group: int,
            topk_group: int, group_score: str, activation: str, act_alpha: float, glu_limit: Optional[float],
            up_shift: float) -> Tensor:
    args = (x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down, shared_gate,
            shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize, routed_scaling, n_group, topk_group,
            group_score, activation, act_alpha, glu_limit, up_shift)
    spec, w = _spec_and_weights(*args)
    x2 = x.reshape(-1, x.shape[-1])
    weights = [t for t in (w_router, w_up, w_down, w_gate, b_router, shared_up, shared_down, shared_gate,
                           shared_gate_proj, b_gate, b_up, b_down) if t is not None]
    if why_not_kernels(x, weights) is not None:
        return reference.moe(x2, w, spec)[0].reshape(x.shape).clone()
    c = compile_spec(spec, x.dtype, ("y",), arch_of(x.device))
    (y,) = c.program.run(moe_inputs(x2.contiguous(), w))
    return y.reshape(x.shape)


@_moe_op.register_fake
def _moe_fake(x, *rest):
    _spec_and_weights(x, *rest)            # a meta call, or a meta weight beside a real x, is checked too
    return torch.empty_like(x)


_ARGS = ("x", "w_router", "w_up", "w_down", "w_gate", "b_router", "score_bias", "shared_up", "shared_down",
         "shared_gate", "shared_gate_proj", "b_gate", "b_up", "b_down")


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs[:len(_ARGS)]])
    ctx.present = [t is not None for t in inputs[:len(_ARGS)]]
    ctx.config = inputs[len(_ARGS):]


@torch.library.custom_op("moec::moe_backward", mutates_args=())
def _moe_backward_op(dy: Tensor, x: Tensor, w_router: Tensor, w_up: Tensor, w_down: Tensor, w_gate: Optional[Tensor],
                     b_router: Optional[Tensor], score_bias: Optional[Tensor], shared_up: Optional[Tensor],
                     shared_down: Optional[Tensor], shared_gate: Optional[Tensor],
                     shared_gate_proj: Optional[Tensor], b_gate: Optional[Tensor], b_up: Optional[Tensor],
                     b_down: Optional[Tensor], top_k: int, score: str, renormalize: bool, routed_scaling: float,
                     n_group: int, topk_group: int, group_score: str, activation: str, act_alpha: float,
                     glu_limit: Optional[float], up_shift: float) -> list[Tensor]:
    """The gradients of ``x`` and of each weight given (in `_ARGS` order, the selection bias's zero) from the
    generated backward (`moec.ir.backward`); the routing is recomputed by the forward's own routing and
    dispatch steps (`Program.run` with ``needed``), so it is the forward's."""
    tensors = (x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down, shared_gate,
               shared_gate_proj, b_gate, b_up, b_down)
    spec, w = _spec_and_weights(*tensors, top_k, score, renormalize, routed_scaling, n_group, topk_group,
                                group_score, activation, act_alpha, glu_limit, up_shift)
    x2 = x.reshape(-1, x.shape[-1])
    recipe, arch = MoERecipe(spec, ("y",)), arch_of(x.device)
    fwd = compile_program(recipe, x.dtype, arch)
    bwd = compile_program(BackwardRecipe(recipe), x.dtype, arch)
    inputs = moe_inputs(x2.contiguous(), w)
    env = fwd.program.run(inputs, needed=tuple(saved_values(fwd.graph).values()))
    inputs.update(read_saved(fwd.graph, env), dy=dy.reshape(x2.shape))
    got = dict(zip(grad_outputs(bwd.graph), bwd.program.run({n: inputs[n] for n, _ in bwd.graph.inputs})))
    return [got[name].reshape(t.shape) if name in got else torch.zeros_like(t)
            for name, t in zip(_ARGS, tensors) if t is not None]


@_moe_backward_op.register_fake
def _moe_backward_fake(dy, x, *rest):
    return [torch.empty_like(t) for t in (x, *rest[:len(_ARGS) - 1]) if t is not None]


def _backward(ctx, grad):
    saved = [t if p else None for t, p in zip(ctx.saved_tensors, ctx.present)]
    needs = list(ctx.needs_input_grad[:len(_ARGS)])
    needs[_ARGS.index("score_bias")] = False             # the selection bias only picks experts: no gradient
    weights = [t for name, t in zip(_ARGS[1:], saved[1:]) if t is not None and name != "score_bias"]
    if why_not_kernels(saved[0], weights) is None:        # as the forward decided (the bias may be fp32)
        it = iter(torch.ops.moec.moe_backward(grad, *saved, *ctx.config))
        grads = [next(it) if t is not None else None for t in saved]
        return (*[g if n else None for g, n in zip(grads, needs)], *[None] * len(ctx.config))

    def layer(leaves):
        spec, w = _spec_and_weights(*leaves, *ctx.config)
        x = leaves[0]
        return (reference.moe(x.reshape(-1, x.shape[-1]), w, spec)[0].reshape(x.shape),)

    grads = reference_grads(layer, saved, needs, (grad,))
    return (*grads, *[None] * len(ctx.config))


_moe_op.register_autograd(_backward, setup_context=_setup)


def moe(x: Tensor, w_router: Tensor, w_up: Tensor, w_down: Tensor, w_gate: Optional[Tensor] = None, *,
        top_k: int, score: str = "softmax", renormalize: bool = False, routed_scaling: float = 1.0,
        n_group: int = 1, topk_group: int = 1, group_score: str = "max", activation: str = "silu",
        b_router: Optional[Tensor] = None, score_bias: Optional[Tensor] = None,
        shared_up: Optional[Tensor] = None, shared_down: Optional[Tensor] = None,
        shared_gate: Optional[Tensor] = None, shared_gate_proj: Optional[Tensor] = None,
        b_gate: Optional[Tensor] = None, b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None,
        act_alpha: float = 1.0, glu_limit: Optional[float] = None, up_shift: float = 0.0) -> Tensor:
    """A whole MoE layer on ``x [..., d]``: router, top-k, experts, weighted combine (+ shared expert).

    Weights use ``nn.Linear`` layout per expert: ``w_router [E, d]``, ``w_gate``/``w_up [E, f, d]``,
    ``w_down [E, d, f]`` (a ``[E, d, f]`` parameter is passed as ``p.transpose(1, 2)``, no copy).
    With ``w_gate`` the experts are gated (SwiGLU for ``activation="silu"``), else ``act(up)``.
    Router options are those of `moec.spec.RouterConfig`; shared expert weights are 2-D
    (``shared_up [fs, d]``, ``shared_down [d, fs]``), ``shared_gate_proj [1, d]`` adds a sigmoid gate.
    Expert biases ``b_gate``/``b_up [E, f]``, ``b_down [E, d]`` (all of them, or none) and the GLU
    variant ``act_alpha``/``glu_limit``/``up_shift`` are those of `moec.spec.MoESpec` (GPT-OSS:
    ``act_alpha=1.702, glu_limit=7.0, up_shift=1.0``, gate/up as ``gate_up[..., ::2]`` views); a shared
    expert (bias-free) computes the same activation and GLU variant.

    Example::

        y = moec.ops.moe(x, router.weight, w_up, w_down, w_gate, top_k=2, renormalize=True)
    """
    args.integer("top_k", top_k)
    args.integer("n_group", n_group)
    args.integer("topk_group", topk_group)
    args.choice("score", score, SCORES)
    args.choice("group_score", group_score, ("max", "top2_sum"))
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    routed_scaling, act_alpha, up_shift = (args.number(n, v) for n, v in (
        ("routed_scaling", routed_scaling), ("act_alpha", act_alpha), ("up_shift", up_shift)))
    glu_limit = args.number("glu_limit", glu_limit, positive=True, optional=True)
    _spec_and_weights(x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down, shared_gate,
                      shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize, routed_scaling, n_group,
                      topk_group, group_score, activation, act_alpha, glu_limit, up_shift)
    return torch.ops.moec.moe(x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down,
                              shared_gate, shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize,
                              routed_scaling, n_group, topk_group, group_score, activation, act_alpha, glu_limit,
                              up_shift)


def moe_reference(x: Tensor, w_router: Tensor, w_up: Tensor, w_down: Tensor, w_gate: Optional[Tensor] = None,
                  **options) -> Tensor:
    """The eager PyTorch reference of `moe` (same arguments), for checks and as documentation."""
    names = ("b_router", "score_bias", "shared_up", "shared_down", "shared_gate", "shared_gate_proj",
             "b_gate", "b_up", "b_down")
    tensors = [options.pop(n, None) for n in names]
    cfg = dict(score="softmax", renormalize=False, routed_scaling=1.0, n_group=1, topk_group=1,
               group_score="max", activation="silu", act_alpha=1.0, glu_limit=None, up_shift=0.0)
    unknown = set(options) - set(cfg) - {"top_k"}
    if unknown:
        raise TypeError(f"moe_reference got unknown options {sorted(unknown)}")
    cfg.update(options)
    top_k = cfg.pop("top_k")
    spec, w = _spec_and_weights(x, w_router, w_up, w_down, w_gate, *tensors, top_k, *cfg.values())
    return reference.moe(x.reshape(-1, x.shape[-1]), w, spec)[0].reshape(x.shape)


# ---- MoBA --------------------------------------------------------------------------------------
# `moba_attention`: each query attends to its own block (causally) plus the top-k-1 past key blocks
# whose mean key scores highest. The backward runs generated kernels (``torch.ops.moec.moba_attention_backward``:
# d q by query tiles, d k / d v key-block-major) for the **same** block indices the forward used, from its
# saved out and lse, so gradients are those of the computed forward (where the kernels do not apply: the
# eager dense attention over those blocks, `moba_attention_from_indices`, under autograd); the selection
# itself is discrete and gets no gradient (``kconv_weight`` gets none either: it only feeds the selection).

SCHEMES = ("auto", "rows", "densify")


def moba_recipe(q: Tensor, k: Tensor, *, block_size: int, top_k: int, cu_seqlens: Optional[Tensor] = None,
                kconv_weight: Optional[Tensor] = None, scheme: str = "auto") -> MobaRecipe:
    """The compile recipe of a `moba_attention` call (its config, packing, key convolution, scheme)."""
    cfg = MobaConfig(block_size, top_k, q.shape[1], k.shape[1], q.shape[3])
    return MobaRecipe(cfg, varlen=cu_seqlens is not None, kconv=0 if kconv_weight is None else kconv_weight.shape[2],
                      scheme=scheme, outputs=("out", "lse", "indices"))


def kernels_apply(q: Tensor, k: Tensor, v: Tensor, kconv_weight: Optional[Tensor] = None) -> bool:
    """Whether `moba_attention` runs the generated kernels for these inputs (else the eager reference)."""
    return why_not_kernels(q, [k, v]) is None and (kconv_weight is None or kconv_weight.device == q.device)


def moba_forward_kernels(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int,
                         cu_seqlens: Optional[Tensor] = None, kconv_weight: Optional[Tensor] = None,
                         arch=None, scheme: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The compiled MoBA program's ``(out, lse, indices)``. ``arch`` picks the tiles (default: the
    device's); ``scheme`` the attention kernels (``"rows"``, ``"densify"`` or ``"auto"``: see
    `moec.passes.choose_moba_scheme`)."""
    args.moba_args(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, True)
    check_scheme(scheme)
    recipe = moba_recipe(q, k, block_size=block_size, top_k=top_k, cu_seqlens=cu_seqlens, kconv_weight=kconv_weight,
                         scheme=scheme)
    c = compile_program(recipe, q.dtype, resolve(arch, q.device))
    inputs = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens, "kconv_weight": kconv_weight}
    out, lse, idx = c.program.run({n: t for n, t in inputs.items() if t is not None})
    return out, lse, idx


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


@torch.library.custom_op("moec::moba_attention", mutates_args=())
def _moba_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], kconv_weight: Optional[Tensor],
             block_size: int, top_k: int, causal: bool, scheme: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    args.moba_args(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal)
    moba_ref.check_inputs(q, k, v, block_size=block_size, top_k=top_k, causal=causal)       # causal only
    check_scheme(scheme)
    if kernels_apply(q, k, v, kconv_weight):
        # any strides: the kernels take them as arguments (e.g. q.transpose(1, 2) of a [B, N, H, D] tensor)
        return moba_forward_kernels(q, k, v, block_size=block_size, top_k=top_k, cu_seqlens=cu_seqlens,
                                    kconv_weight=kconv_weight, scheme=scheme)
    idx = moba_ref.moba_block_selection(q, k, block_size=block_size, top_k=top_k, causal=causal,
                                        cu_seqlens=cu_seqlens, kconv_weight=kconv_weight)
    out, lse = moba_ref.moba_attention_from_indices(q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens)
    return out.contiguous(), lse.contiguous(), idx


@_moba_op.register_fake
def _moba_fake(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal, scheme="auto"):
    args.moba_args(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal, read_values=False)
    B, H, N, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # contiguous, as the kernels and the reference return them (q may be a strided view)
    return (q.new_empty(q.shape), q.new_empty((B, H, N), dtype=lse_dtype),
            q.new_empty((B, H, N, top_k), dtype=torch.int32))


def _moba_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, kconv, block_size, top_k, _causal, scheme = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], output[2], cu_seqlens)
    ctx.block_size, ctx.top_k = block_size, top_k
    ctx.kernels = kernels_apply(q, k, v, kconv)
    ctx.set_materialize_grads(False)       # an output the loss does not use gets None (not zeros) below


def moba_backward_program(q: Tensor, k: Tensor, *, block_size: int, top_k: int, varlen: bool):
    """The compiled backward program of a MoBA core (`moec.ir.backward.build_moba_backward_graph`)."""
    cfg = MobaConfig(block_size, top_k, q.shape[1], k.shape[1], q.shape[3])
    return compile_program(BackwardRecipe(MobaRecipe(cfg, varlen=varlen)), q.dtype, arch_of(q.device)).program


@torch.library.custom_op("moec::moba_attention_backward", mutates_args=())
def _moba_backward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], indices: Tensor, out: Tensor,
                      lse: Tensor, d_out: Tensor, d_lse: Tensor, block_size: int,
                      top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(d q, d k, d v)`` of `moba_attention` from the generated backward kernels (the forward's blocks)."""
    program = moba_backward_program(q, k, block_size=block_size, top_k=top_k, varlen=cu_seqlens is not None)
    inputs = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens, "indices": indices, "out": out, "lse": lse,
              "d_out": d_out, "d_lse": d_lse}
    dq, dk, dv = program.run({n: t for n, t in inputs.items() if t is not None})
    return dq, dk, dv


@_moba_backward_op.register_fake
def _moba_backward_fake(q, k, v, cu_seqlens, indices, out, lse, d_out, d_lse, block_size, top_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)      # contiguous, as the kernels


def _moba_backward(ctx, grad_out, grad_lse, _grad_idx):
    q, k, v, out, lse, idx, cu_seqlens = ctx.saved_tensors
    if ctx.kernels:
        g_out = grad_out if grad_out is not None else torch.zeros_like(out)
        g_lse = grad_lse if grad_lse is not None else torch.zeros_like(lse)
        grads = torch.ops.moec.moba_attention_backward(q, k, v, cu_seqlens, idx, out, lse, g_out, g_lse,
                                                       ctx.block_size, ctx.top_k)
        needs = list(ctx.needs_input_grad[:3])
        needs[2] = needs[2] and grad_out is not None        # the lse does not depend on v: eager leaves None
        grads = [g if n else None for g, n in zip(grads, needs)]
        return (*grads, None, None, None, None, None, None)

    def attend(qkv):          # the blocks the forward selected; rows with lse = -inf carry no gradient
        o, l = moba_ref.moba_attention_from_indices(*qkv, idx, block_size=ctx.block_size, cu_seqlens=cu_seqlens)
        return o, torch.where(torch.isinf(l), 0.0, l)

    grads = reference_grads(attend, (q, k, v), ctx.needs_input_grad[:3], (grad_out, grad_lse))
    return (*grads, None, None, None, None, None, None)


_moba_op.register_autograd(_moba_backward, setup_context=_moba_setup)


def moba_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool = True,
                   cu_seqlens: Optional[Tensor] = None, kconv_weight: Optional[Tensor] = None,
                   return_lse: bool = False, scheme: str = "auto"):
    """Mixture-of-Block-Attention, forward: each query attends to ``top_k`` key blocks of ``block_size``
    keys (its own, causally, plus the best-scoring past blocks by ``q . mean(block keys)``).

    ``q [B, H, N, D]``, ``k``/``v [B, Hkv, N, D]`` (GQA when ``Hkv < H``); ``cu_seqlens`` (int32
    ``[S+1]``, with ``B = 1``) packs variable-length sequences along N; ``kconv_weight [Hkv, D, kc]``
    convolves the keys causally before pooling (routing only). The exact definition is in
    `moec.moba.reference`. Returns ``out [B, H, N, D]``, and with ``return_lse`` also the fp32
    log-sum-exp ``[B, H, N]``. Differentiable in q, k, v (generated backward kernels over the blocks the
    forward selected). ``scheme`` picks the attention kernels: ``"rows"`` (query tiles
    with row masks: short sequences), ``"densify"`` (FlashMoBA's gathered tiles, each window of
    queries owning its softmax state: long sequences) or ``"auto"`` (densify when the average
    sequence has more than 4 x top_k blocks; a threshold not yet measured on a GPU); all give the same
    result.

    Example::

        out = moba_attention(q, k, v, block_size=128, top_k=8)
    """
    args.moba_args(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal)
    check_scheme(scheme)
    out, lse, _ = torch.ops.moec.moba_attention(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal, scheme)
    return (out, lse) if return_lse else out
