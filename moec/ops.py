"""`moec.ops.moe`: the fused MoE layer as one functional op, registered with ``torch.library``.

New model code can call it directly; ``torch.compile`` sees ``torch.ops.moec.moe`` as a single
op (a fake implementation gives it shapes). The implementation runs moec's generated kernels
(the Triton interpreter on a CPU) and falls back to the eager reference where the kernels do
not apply (float64, bfloat16 on a CPU, other devices); the backward recomputes the eager
reference under autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .spec import MoESpec, MoEWeights, RouterConfig, SharedExpertConfig

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _spec_and_weights(x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down,
                      shared_gate, shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize,
                      routed_scaling, n_group, topk_group, group_score, activation, act_alpha, glu_limit,
                      up_shift):
    if x.shape[-1] != w_router.shape[1]:
        raise ValueError(f"x has hidden size {x.shape[-1]}, w_router is {tuple(w_router.shape)}")
    E, f, d = w_up.shape
    if w_router.shape[0] != E or tuple(w_down.shape) != (E, d, f):
        raise ValueError(f"inconsistent expert weights: w_router {tuple(w_router.shape)}, "
                         f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)} (expect [E,f,d], [E,d,f])")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} must match w_up {tuple(w_up.shape)}")
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
    from .compiler import compile_spec
    from .region import graph_inputs
    from moec.runtime.arch import arch_of
    args = (x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down, shared_gate,
            shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize, routed_scaling, n_group, topk_group,
            group_score, activation, act_alpha, glu_limit, up_shift)
    spec, w = _spec_and_weights(*args)
    x2 = x.reshape(-1, x.shape[-1])
    weights = [t for t in (w_router, w_up, w_down, w_gate, b_router, shared_up, shared_down, shared_gate,
                           shared_gate_proj, b_gate, b_up, b_down) if t is not None]
    kernels_ok = (x.dtype in _KERNEL_DTYPES and x.device.type in ("cpu", "cuda")
                  and not (x.device.type == "cpu" and x.dtype == torch.bfloat16)
                  and all(t.dtype == x.dtype and t.device == x.device for t in weights))
    if not kernels_ok:
        return reference.moe(x2, w, spec)[0].reshape(x.shape).clone()
    c = compile_spec(spec, x.dtype, ("y",), arch_of(x.device))
    (y,) = c.program.run(graph_inputs(x2.contiguous(), w))
    return y.reshape(x.shape)


@_moe_op.register_fake
def _(x, *rest):
    return torch.empty_like(x)


_ARGS = ("x", "w_router", "w_up", "w_down", "w_gate", "b_router", "score_bias", "shared_up", "shared_down",
         "shared_gate", "shared_gate_proj", "b_gate", "b_up", "b_down")


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs[:len(_ARGS)]])
    ctx.present = [t is not None for t in inputs[:len(_ARGS)]]
    ctx.config = inputs[len(_ARGS):]


def _backward(ctx, grad):
    saved = [t if p else None for t, p in zip(ctx.saved_tensors, ctx.present)]
    needs = ctx.needs_input_grad[:len(_ARGS)]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(saved, needs)]
        spec, w = _spec_and_weights(*leaves, *ctx.config)
        x = leaves[0]
        y = reference.moe(x.reshape(-1, x.shape[-1]), w, spec)[0].reshape(x.shape)
        wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
        got = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
    grads = [next(got) if n and t is not None else None for t, n in zip(leaves, needs)]
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
    ``act_alpha=1.702, glu_limit=7.0, up_shift=1.0``, gate/up as ``gate_up[..., ::2]`` views).

    Example::

        y = moec.ops.moe(x, router.weight, w_up, w_down, w_gate, top_k=2, renormalize=True)
    """
    return torch.ops.moec.moe(x, w_router, w_up, w_down, w_gate, b_router, score_bias, shared_up, shared_down,
                              shared_gate, shared_gate_proj, b_gate, b_up, b_down, top_k, score, renormalize,
                              float(routed_scaling), n_group, topk_group, group_score, activation, float(act_alpha),
                              None if glu_limit is None else float(glu_limit), float(up_shift))


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


from .moba.ops import moba_attention  # noqa: E402  (MoBA forward: fused gate + block-sparse attention)
