"""Module adapters: lifting rules for MoE blocks that the generic reader cannot read.

The generic frontend (`structure` + `trace` + `experts` + the probe) reads most MoE blocks,
including the Hugging Face transformers 5 ones (a router module with a ``weight`` and an experts
module with stacked ``gate_up_proj [E, 2f, d]`` / ``down_proj [E, d, f]``). An adapter is for a
block it cannot read (weights kept in an unusual layout, e.g. DBRX's ``[E*f, d]`` matrices) or
that moec knows it cannot compute (so `explain()` can say exactly why).

An adapter is registered for a class *name* and the prefix of the module defining the class, so
moec matches ``transformers`` classes without importing transformers. Its builder returns

- a `LiftedMoE` candidate: `moec.frontend.lift` confirms it with the probe (the module's own
  eager forward vs `moec.reference.moe`) before it is used, exactly as a generic reading;
- a `NotLifted` with the reason (the block stays eager);
- None: not a layout this adapter knows (say, another library version): the generic reader runs.

`lift` consults this registry first; `find_moe_modules` treats a matched module as a candidate.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .. import reference
from ..spec import ACTIVATIONS, GLU_PLAIN, MoESpec, MoESpecError, RouterConfig
from .lifted import LiftedMoE, NotLifted, ParamTensors, Src, WeightsRecipe

Built = Union[LiftedMoE, NotLifted, None]


@dataclass(frozen=True)
class Adapter:
    """``build(module)`` for modules whose class is named ``class_name`` and defined in a module
    whose name starts with ``module_prefix``."""

    class_name: str
    module_prefix: str
    build: Callable[[nn.Module], Built]
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.module_prefix.rstrip('.')}:{self.class_name}" if self.module_prefix else self.class_name


_ADAPTERS: dict[str, list[Adapter]] = {}


def register_adapter(class_name: str, module_prefix: str = "", description: str = ""):
    """Decorator: register ``build(module) -> LiftedMoE | NotLifted | None`` for a class name.
    A later registration for the same (name, prefix) replaces the earlier one."""
    def deco(build: Callable[[nn.Module], Built]) -> Callable[[nn.Module], Built]:
        entries = [a for a in _ADAPTERS.get(class_name, []) if a.module_prefix != module_prefix]
        entries.append(Adapter(class_name, module_prefix, build, description or (build.__doc__ or "").strip()))
        entries.sort(key=lambda a: -len(a.module_prefix))          # the most specific prefix first
        _ADAPTERS[class_name] = entries
        return build
    return deco


def adapter_for(module: nn.Module) -> Optional[Adapter]:
    """The adapter registered for ``module``'s class (matched by name and defining module), if any."""
    cls = type(module)
    for a in _ADAPTERS.get(cls.__name__, ()):
        if (cls.__module__ or "").startswith(a.module_prefix):
            return a
    return None


def adapters() -> list[Adapter]:
    return [a for entries in _ADAPTERS.values() for a in entries]


def activation_of(fn: Callable) -> Optional[str]:
    """Which of moec's activations ``fn`` computes, found by evaluating it (None: none of them). A module is
    evaluated as a copy, with the random number generators forked, so its state (buffers a forward updates)
    and the user's random stream stay as they were."""
    # and magnitudes far past the grid: a clamp written into the code (no attribute says so) shows there
    x = torch.cat([torch.linspace(-8.0, 8.0, 161), torch.tensor(REACH)])
    try:
        if isinstance(fn, nn.Module):
            fn = copy.deepcopy(fn)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y = fn(x.clone())
    except Exception:  # noqa: BLE001 - not an elementwise activation (or one that cannot be copied)
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    for name in ACTIVATIONS:
        ref = reference.activation(name, x)
        if torch.allclose(y.float(), ref, rtol=1e-5, atol=1e-6):
            return name
    return None


# magnitudes past which no activation of a real model goes (fp32 keeps them finite through silu, gelu, relu^2)
REACH = [-1e3, -300.0, -100.0, -30.0, 30.0, 100.0, 300.0, 1e3]


def module_state(m: nn.Module) -> tuple:
    """Every plain attribute (number, bool, string, None) of a module tree, for cache keys."""
    return tuple((path, k, v) for path, sub in m.named_modules() for k, v in sorted(vars(sub).items())
                 if isinstance(v, (int, float, bool, str, type(None))) and k != "training")


def module_numbers(m: nn.Module) -> list:
    """The positive finite numbers a module tree keeps as plain attributes (a softcap's ``c``)."""
    out = []
    for sub in m.modules():
        for v in vars(sub).values():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") and v not in out:
                out.append(float(v))
    return out[:16]


def gated_form(act: nn.Module) -> Optional[tuple]:
    """``(activation, GLU variant)`` that a gated activation module ``act(gate, up)`` computes, found by
    evaluating it (a copy, RNG forked) on a grid of gate and up values and comparing with
    `moec.reference.gated` for each form its numbers allow: plain GLU of each activation, and
    softcapped (`moec.spec.MoESpec`'s ``gate_softcap``/``up_softcap``) with the module's own constants.
    None when no form matches."""
    caps = [None] + module_numbers(act)
    reach = 3.0 * max([c for c in caps if c is not None] + [2.0])     # well past every candidate cap
    g = torch.cat([torch.linspace(-reach, reach, 49), torch.tensor(REACH)])[:, None].expand(-1, 17).contiguous()
    u = torch.cat([torch.linspace(-reach, reach, 13), torch.tensor(REACH[::2])])[None, :].expand(g.shape[0], 17)
    u = u.contiguous()
    try:
        fn = copy.deepcopy(act)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y = fn(g.clone(), u.clone())
    except Exception:  # noqa: BLE001 - not a gated activation of (gate, up)
        return None
    if not isinstance(y, torch.Tensor) or y.shape != g.shape:
        return None
    for name in ACTIVATIONS:
        for gate_cap in (caps if name == "silu" else [None]):
            for up_cap in caps:
                variant = {k: v for k, v in (("gate_softcap", gate_cap), ("up_softcap", up_cap)) if v is not None}
                if torch.allclose(y.float(), reference.gated(g, u, name, **variant), rtol=1e-5, atol=1e-5):
                    return name, variant
    return None


def gate_method_form(experts: nn.Module, f: int, splits=(False,), acts=ACTIVATIONS, forms=()) -> Optional[tuple]:
    """``(interleaved, activation, GLU variant)`` that an experts module's ``_apply_gate(gate_up [rows, 2 f])``
    computes on its columns split in halves (gate first) or, for ``interleaved`` in ``splits``, into even and
    odd ones, found by evaluating it once on rows past any clamp against `moec.reference.gated`: first the
    ``forms`` given (``(activation, variant)``: an activation module's `gated_form`), then the variants the
    module's own numbers allow (silu's slope, a clamp, the up shift of 1: GPT-OSS's and MiniMax-M3's clamped
    SwiGLU) for each of ``acts``. None when no form matches."""
    nums = [n for n in module_numbers(experts) if n < 1e3]
    # rows past every clamp the module's numbers could set, so a clamp that binds anywhere binds here
    scale = torch.tensor([8.0] * 24 + [3.0 * max(nums + [8.0])] * 24 + [REACH[-1]] * 16)[:, None]
    z = torch.randn(64, 2 * f, generator=torch.Generator().manual_seed(0)) * scale
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y = experts._apply_gate(z.clone())
    except Exception:  # noqa: BLE001 - not evaluable on its own
        return None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (64, f):
        return None
    candidates = list(forms) + [
        (name, {k: v for k, v in (("act_alpha", alpha), ("glu_limit", limit), ("up_shift", shift))
                if v != GLU_PLAIN[k]})
        for name in acts for alpha in ([1.0] + nums if name == "silu" else [1.0])
        for limit in [None] + nums for shift in (0.0, 1.0)]
    for interleaved in splits:
        g, u = (z[:, 0::2], z[:, 1::2]) if interleaved else (z[:, :f], z[:, f:])
        for name, variant in candidates:
            if torch.allclose(y.float(), reference.gated(g, u, name, **variant), rtol=1e-5, atol=1e-5):
                return interleaved, name, variant
    return None


def known_activation(act: nn.Module) -> bool:
    """Whether ``act`` is one of moec's activations, or a gated one taking ``(gate, up)`` that computes one
    of moec's GLU forms (`gated_form`)."""
    try:
        params = inspect.signature(act.forward).parameters
    except (TypeError, ValueError):
        return True
    if len([p for p in params.values() if p.default is inspect.Parameter.empty]) != 1:
        return type(act).__name__.lower() in ("swiglu", "geglu") or gated_form(act) is not None
    return activation_of(act) is not None


# ---- Hugging Face transformers --------------------------------------------------------------

_HF = "transformers."


@register_adapter("DbrxFFN", _HF)
def _dbrx_ffn(m: nn.Module) -> Built:
    """DBRX: experts keep ``w1``/``v1``/``w2`` as 2-D ``[E*f, d]`` matrices (w2 used as ``h @ w2_e``)
    in ``experts.mlp``; softmax router ``router.layer``, top-k weights divided by their p-norm."""
    try:
        lin, mlp, experts = m.router.layer, m.experts.mlp, m.experts
        E, f, d, k = int(experts.num_experts), int(experts.ffn_hidden_size), int(experts.hidden_size), int(m.top_k)
        norm = m.moe_normalize_expert_weights
        shapes = {n: tuple(getattr(mlp, n).shape) for n in ("w1", "v1", "w2")}
    except (AttributeError, TypeError):
        return None
    if not isinstance(lin, nn.Linear) or any(s != (E * f, d) for s in shapes.values()) or lin.out_features != E:
        return None
    cls = type(m).__name__
    if norm not in (None, 1, 1.0):
        return NotLifted(f"{cls}: top-k weights are divided by their L{norm:g} norm (moe_normalize_expert_weights="
                         f"{norm}); moec renormalises by the sum only (the L1 norm of positive weights)")
    jitter = getattr(m.router, "moe_jitter_eps", None)
    if jitter:
        return NotLifted(f"{cls}: the router multiplies its input by uniform noise in training (moe_jitter_eps="
                         f"{jitter}), which moec's router does not model")
    act = activation_of(mlp.activation_fn)
    if act is None:
        return NotLifted(f"{cls}: expert activation {type(mlp.activation_fn).__name__} is none of {ACTIVATIONS}")
    paths = ["router.layer.weight", "experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"]
    fields = [("w_router", Src((0,))), ("w_gate", Src((1,), view=(E, f, d))), ("w_up", Src((2,), view=(E, f, d))),
              ("w_down", Src((3,), view=(E, f, d), transpose=True))]
    if lin.bias is not None:
        paths.append("router.layer.bias")
        fields.append(("b_router", Src((4,))))
    try:
        spec = MoESpec(hidden=d, ffn=f, activation=act, glu=True,
                       router=RouterConfig(num_experts=E, top_k=k, renormalize=norm is not None,
                                           router_bias=lin.bias is not None))
    except MoESpecError as e:
        return NotLifted(f"{cls}: {e}")
    return LiftedMoE(spec=spec, formulation="adapter DbrxFFN: 2-D expert matrices [E*f, d], loop over experts",
                     param_tensors=ParamTensors(tuple(paths)), weights=WeightsRecipe(tuple(fields)), outputs="y",
                     notes=[f"experts: experts.mlp.w1/v1/w2 [{E * f}, {d}] read as [{E}, {f}, {d}] "
                            f"(gate=w1, up=v1, down=w2^T), {act} (DbrxFFN adapter)",
                            f"router: router.layer ({'softmax, top-%d' % k}"
                            f"{', renormalised' if norm is not None else ''})"],
                     observed=("router",))


@register_adapter("GptOssMLP", _HF)
def _gpt_oss_mlp(m: nn.Module) -> Built:
    """GPT-OSS: router ``linear + bias -> top-k -> softmax``; experts with ``gate_up_proj [E, d, 2f]``
    (gate and up columns interleaved), per-expert biases, GPT-OSS's clamped SwiGLU
    ``(up.clamp(-l, l) + 1) * g * sigmoid(alpha * g)``, ``g = gate.clamp(max=l)``; forward returns
    ``(y, routing weights [T, k])``."""
    try:
        r, ex = m.router, m.experts
        E, d, f2 = (int(s) for s in ex.gate_up_proj.shape)
        k, alpha, limit = int(r.top_k), float(ex.alpha), float(ex.limit)
        shapes = (tuple(ex.gate_up_proj_bias.shape), tuple(ex.down_proj.shape), tuple(ex.down_proj_bias.shape),
                  tuple(r.weight.shape), tuple(r.bias.shape))
    except (AttributeError, TypeError, ValueError):
        return None
    f = f2 // 2
    if f2 % 2 or shapes != ((E, f2), (E, f, d), (E, d), (E, d), (E,)):
        return None
    paths = ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
             "experts.down_proj", "experts.down_proj_bias")
    fields = (("w_router", Src((0,))), ("b_router", Src((1,))),
              ("w_gate", Src((2,), transpose=True, rows=(0, f2, 2))),
              ("w_up", Src((2,), transpose=True, rows=(1, f2, 2))),
              ("w_down", Src((4,), transpose=True)),
              ("b_gate", Src((3,), cols=(0, f2, 2))), ("b_up", Src((3,), cols=(1, f2, 2))),
              ("b_down", Src((5,))))
    try:
        spec = MoESpec(hidden=d, ffn=f, activation="silu", glu=True, expert_bias=True, act_alpha=alpha,
                       glu_limit=limit, up_shift=1.0,
                       router=RouterConfig(num_experts=E, top_k=k, order="topk_then_score", router_bias=True))
    except MoESpecError as e:
        return NotLifted(f"{type(m).__name__}: {e}")
    return LiftedMoE(spec=spec, formulation="adapter GptOssMLP: stacked [E, d, 2f] weights with interleaved gate/up "
                                            "columns, biases, loop over hit experts",
                     param_tensors=ParamTensors(paths), weights=WeightsRecipe(fields), outputs="y_weights",
                     notes=[f"experts: gate = experts.gate_up_proj[..., 0::2], up = [..., 1::2] (views, no copy), "
                            f"biases likewise; clamped SwiGLU (alpha={alpha:g}, limit={limit:g}, up + 1) "
                            f"(GptOssMLP adapter)",
                            f"router: router (linear with bias, top-{k} then softmax); forward also returns "
                            f"the [T, {k}] routing weights"],
                     observed=("router",))


@register_adapter("PhimoeSparseMoeBlock", _HF)
def _phimoe(m: nn.Module) -> Built:
    """PhiMoE: sparsemixer routing; reported, never lifted."""
    if not hasattr(m, "router") or not hasattr(m.router, "router_jitter_noise"):
        return None
    return NotLifted(
        f"{type(m).__name__}: PhiMoE routes with sparsemixer (each of the top-2 picks is a softmax over the "
        f"experts within a relative margin 2 * router_jitter_noise={2 * m.router.router_jitter_noise:g} of the best "
        f"remaining one; Gumbel sampling in training), which is not one of moec's routers")
