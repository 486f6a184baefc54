"""``experts_implementation="moec"``: transformers' expert computation on moec's kernels.

transformers 5 decorates its experts modules with ``@use_experts_implementation``: the MoE block's
router computes ``top_k_index [T, k]`` and ``top_k_weights [T, k]``, and the experts module's
forward dispatches on ``config._experts_implementation`` to a function
``(experts, hidden_states [T, d], top_k_index, top_k_weights) -> [T, d]``. `moec_experts_forward`
is that function for ``"moec"``:

- it reads the stacked expert weights as views, without copies (``gate_up_proj [E, 2f, d]``, gate
  first, or ``[E, d, 2f]`` when the class is ``is_transposed``; ``down_proj [E, d, f]`` / ``[E, f, d]``;
  ``up_proj`` alone for ungated experts; the ``*_bias`` tensors when ``has_bias``), and the gate by
  evaluating it: the default gate (``act_fn(gate) * up`` on halves, ``act_fn`` one of moec's
  activations) or a custom ``_apply_gate`` that matches one of moec's GLU variants on interleaved or
  halved columns (GPT-OSS: clamped SwiGLU with slope ``alpha``, ``up + 1``, interleaved);
- it compiles the routed experts alone (`moec.compiler.ExpertsRecipe`: no router, ids and weights
  are graph inputs) through the one driver, as every region does: dispatch, permute, gate/up/down
  grouped GEMMs, activation, weighted combine, through moec's pass pipeline and lowering, so the
  program is the same three generated kernels the experts of a lifted layer run: grouped GEMM with
  gather + GLU epilogue, grouped GEMM with scale + scatter epilogue, deterministic top-k reduce;
- with gradients needed, the backward runs generated kernels too (`moec.ir.backward`: gradients for
  hidden states, routing weights and expert weights; the gate/up projections recomputed from x).

Each experts module gets an `ExpertsRegion` at its first call (`moec.region.Region`: its programs,
calls by what served them, dumps).

What it cannot serve runs the experts module's own eager forward (the ``"eager"`` implementation),
counted per reason (`calls`): a custom gate none of moec's GLU variants matches, an activation that is
none of moec's, a post-expert norm, expert parallelism, and inputs the kernels do not take (float64,
bf16 on a CPU, mixed dtypes/devices).
``MOEC_DUMP_DIR`` receives each program's IR stages, kernels and launches under ``hf_experts.*``.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from moec.compiler import BackwardRecipe, ExpertsRecipe
from moec.ir.backward import PRE_SAVED, grad_outputs, read_saved
from moec.frontend.adapters import activation_of, gate_method_form, gated_form, module_state
from moec.region import Region, empty_with_grad, is_disabled
from moec.runtime.autograd import KernelsBoth
from moec.runtime.support import why_not_kernels
from moec.spec import ACTIVATIONS


# ---- reading an experts module ----------------------------------------------------------------

_WEIGHT_FIELDS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one transformers experts module stores its weights (shapes fixed at first use)."""

    E: int
    d: int
    f: int
    glu: bool
    activation: str
    transposed: bool
    bias: bool = False
    interleaved: bool = False     # gate = gate_up columns 0::2, up = 1::2 (else the two halves)
    variant: tuple = ()           # the GLU variant's non-default items ((name, value), ...)

    def _halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return (t[:, 0::2], t[:, 1::2]) if self.interleaved else (t[:, :self.f], t[:, self.f:])

    @property
    def leaf_names(self) -> tuple[str, ...]:
        """The module's own tensors the experts read, in `leaves` order."""
        names = ("gate_up_proj" if self.glu else "up_proj", "down_proj")
        return names + (("gate_up_proj_bias" if self.glu else "up_proj_bias", "down_proj_bias") if self.bias else ())

    def leaves(self, m: nn.Module) -> list:
        return [getattr(m, n) for n in self.leaf_names]

    def views(self, leaves) -> dict:
        """`MoEWeights`-named views of ``leaves`` (the module's tensors, or gradient buffers laid out like them;
        None stays None): ``w_gate``/``w_up`` ``[E, f, d]``, ``w_down`` ``[E, d, f]`` and, with biases,
        ``b_gate``/``b_up`` ``[E, f]``, ``b_down`` ``[E, d]`` (``w_gate``/``b_gate`` None for ungated experts)."""
        tr = (lambda t: t.transpose(1, 2)) if self.transposed else (lambda t: t)   # noqa: E731
        w = dict.fromkeys(_WEIGHT_FIELDS)
        by = dict(zip(self.leaf_names, leaves))
        if by["down_proj"] is not None:
            w["w_down"] = tr(by["down_proj"])
        if self.glu and by["gate_up_proj"] is not None:
            w["w_gate"], w["w_up"] = self._halves(tr(by["gate_up_proj"]))
        elif not self.glu and by["up_proj"] is not None:
            w["w_up"] = tr(by["up_proj"])
        if self.bias:
            w["b_down"] = by["down_proj_bias"]
            if self.glu and by["gate_up_proj_bias"] is not None:
                w["b_gate"], w["b_up"] = self._halves(by["gate_up_proj_bias"])
            elif not self.glu:
                w["b_up"] = by["up_proj_bias"]
        return w

    def weights(self, m: nn.Module) -> dict:
        """`views` of the module's tensors."""
        return self.views(self.leaves(m))


def _gate_fn(m: nn.Module):
    """The function ``m._apply_gate`` runs: its class's, or one set on the instance (a bound method)."""
    gate = getattr(m, "_apply_gate", None)
    return getattr(gate, "__func__", gate)


def _default_gate(m: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except Exception:  # noqa: BLE001 - another transformers layout: do not guess
        return False
    return _gate_fn(m) is _default_apply_gate


def _cached(m: nn.Module, name: str, key: tuple, compute):
    got = m.__dict__.get(name)
    if got is None or got[0] != key:
        got = (key, compute())
        m.__dict__[name] = got
    return got[1]


def _custom_gate(m: nn.Module, act: Optional[str], f: int):
    """``(interleaved, activation, variant)`` of moec's GLU forms that ``m._apply_gate`` computes (halved or
    interleaved columns; plain, clamped as GPT-OSS's and MiniMax-M3's, or with the softcaps of an activation
    module ``m.act_fn``), found by evaluating it, or None."""
    act_fn = getattr(m, "act_fn", None)
    gated = gated_form(act_fn) if isinstance(act_fn, nn.Module) else None     # Inkling2's softcapped SwiGLU
    form = gate_method_form(m, f, (False, True), [act] if act else ACTIVATIONS, [gated] if gated else ())
    return None if form is None else (form[0], form[1], tuple(sorted(form[2].items())))


def read_layout(m: nn.Module, d: int):
    """The `ExpertsLayout` of experts module ``m`` for hidden size ``d``, or the reason it has none."""
    if getattr(m, "has_post_expert_norm", False):
        return "a post-expert norm"
    if getattr(m, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    glu = bool(getattr(m, "has_gate", True))
    bias = bool(getattr(m, "has_bias", False))
    act_fn = getattr(m, "act_fn", None)
    act = _cached(m, "_moec_activation", (act_fn,),
                  lambda: activation_of(act_fn) if act_fn is not None else None)
    transposed = bool(getattr(m, "is_transposed", False))
    try:
        w = m.gate_up_proj if glu else m.up_proj
        down = m.down_proj
        E = int(getattr(m, "num_experts", w.shape[0]))
    except AttributeError as e:
        return f"weights not found ({e})"
    wf = w.transpose(1, 2) if transposed else w
    df = down.transpose(1, 2) if transposed else down
    f = wf.shape[1] // 2 if glu else wf.shape[1]
    if (wf.dim() != 3 or tuple(wf.shape) != (E, 2 * f if glu else f, d) or tuple(df.shape) != (E, d, f)):
        return (f"unexpected weight shapes {'gate_up_proj' if glu else 'up_proj'} {tuple(w.shape)}, "
                f"down_proj {tuple(down.shape)} for hidden size {d}")
    if bias:
        try:
            shapes = (tuple(getattr(m, "gate_up_proj_bias" if glu else "up_proj_bias").shape),
                      tuple(m.down_proj_bias.shape))
        except AttributeError as e:
            return f"biases not found ({e})"
        if shapes != ((E, 2 * f if glu else f), (E, d)):
            return f"unexpected bias shapes {shapes}"
    interleaved, variant = False, ()
    if glu and not _default_gate(m):
        gate_key = (_gate_fn(m), act_fn, f, module_state(m))
        form = _cached(m, "_moec_gate", gate_key, lambda: _custom_gate(m, act, f))
        if form is None:
            return (f"a custom gate ({type(m).__name__}._apply_gate) that is none of moec's GLU forms "
                    f"(act(gate) * up, GPT-OSS's clamped SwiGLU, softcapped SwiGLU; halved or interleaved columns)")
        interleaved, act, variant = form
    if act is None:
        return f"activation {type(act_fn).__name__} (moec's experts compute silu, gelu, gelu_tanh, relu or relu**2)"
    return ExpertsLayout(E, d, f, glu, act, transposed, bias, interleaved, variant)


# ---- the forward ------------------------------------------------------------------------------

def _why_eager(x: Tensor, ids: Tensor, wts: Tensor, tensors) -> Optional[str]:
    if not isinstance(x, Tensor) or x.dim() != 2 or ids.dim() != 2 or wts.shape != ids.shape \
            or ids.shape[0] != x.shape[0]:
        return f"inputs of shapes {tuple(getattr(x, 'shape', ()))}, {tuple(ids.shape)}, {tuple(wts.shape)}"
    if wts.device != x.device or ids.device != x.device:
        return "routing tensors on another device"
    return why_not_kernels(x, tensors)


@dataclass(eq=False)
class ExpertsRegion(Region):
    """The region of one transformers experts module run with ``experts_implementation="moec"``."""

    def dump_suffix(self, c) -> str:
        return f".{getattr(c.recipe, 'of', c.recipe).name}"        # a backward's: its forward's name


def _region(m: nn.Module) -> ExpertsRegion:
    region = m.__dict__.get("_moec_experts_region")
    if region is None:
        dump = os.environ.get("MOEC_DUMP_DIR")
        region = m.__dict__["_moec_experts_region"] = ExpertsRegion("hf_experts", dump_dir=Path(dump) if dump else None)
    return region


def calls(model: nn.Module) -> Counter:
    """How the experts modules under ``model`` ran with ``experts_implementation="moec"``:
    ``"kernels"``, ``"kernels forward and backward"`` (and ``"backward: kernels"`` per backward) or ``"eager: <reason>"``, summed."""
    total: Counter = Counter()
    for m in model.modules():
        region = m.__dict__.get("_moec_experts_region")
        if region is not None:
            total.update(region.calls)
    return total


def interface_forward(cls: type):
    """The forward transformers' ``@use_experts_implementation`` gave ``cls`` (or a base of it): the dispatch on
    ``config._experts_implementation``, whose ``__wrapped__`` is the class's own eager forward; None if none."""
    for c in cls.__mro__:
        fwd = c.__dict__.get("forward")
        code = getattr(fwd, "__code__", None)
        if getattr(fwd, "__wrapped__", None) is not None and "experts_interface" in getattr(code, "co_freevars", ()):
            return fwd
    return None


def _eager_forward(m: nn.Module):
    fwd = interface_forward(type(m))
    return functools.partial(fwd.__wrapped__, m) if fwd is not None else None


def _recipe(layout: ExpertsLayout, k: int, saving: str = "") -> ExpertsRecipe:
    return ExpertsRecipe(layout.E, k, layout.d, layout.f, layout.activation, layout.glu, layout.bias, layout.variant,
                         saving)


def run_kernels(region: ExpertsRegion, x: Tensor, ids: Tensor, wts: Tensor, layout: ExpertsLayout,
                w: dict, saving: bool = False):
    """The experts' output; with ``saving``, ``((y,), {role: what the backward reads})``."""
    c = region.compiled_for(_recipe(layout, ids.shape[1], region.saving if saving else ""), x.dtype, x.device)
    inputs = {"x": x if x.stride(-1) == 1 else x.contiguous(), "ids": ids.to(torch.int32).contiguous(),
              "weights": wts.to(torch.float32).contiguous(), **{n: t for n, t in w.items() if t is not None}}
    if not saving:
        (y,) = region.run(c, inputs)
        return y
    env = region.run(c, inputs, values=True)
    return (env[c.graph.outputs[0]],), read_saved(c.graph, env)


def kernels_backward(region: ExpertsRegion, ts, saved, grads, needs, layout: ExpertsLayout, k: int) -> list:
    """The gradients of ``(x, weights, *the module's tensors)`` wanted (``needs``) from the generated backward;
    only the kernels those need run (frozen experts: no weight-gradient kernels). Each weight gradient is written
    straight into a buffer laid out like the module's tensor (transposed, gate and up halves or interleaved
    columns of one ``gate_up_proj``), which becomes its gradient: nothing is sliced or added up afterwards."""
    x, wts, leaves = ts[0], ts[1], ts[2:]
    bw = region.compiled_for(BackwardRecipe(_recipe(layout, k), tuple(r for r in PRE_SAVED if r in saved)),
                             x.dtype, x.device)
    inputs = {"dy": grads[0] if grads[0] is not None else torch.zeros_like(x), "x": x,
              **{n: t for n, t in layout.views(leaves).items() if t is not None}, **saved}
    values = dict(zip(grad_outputs(bw.graph), bw.graph.outputs))
    buffers = [torch.empty_like(t) if need else None for t, need in zip(leaves, needs[2:])]
    into = {values[f]: v for f, v in layout.views(buffers).items() if v is not None}
    wanted = [values[n] for n, need in (("x", needs[0]), ("route_weights", needs[1])) if need] + list(into)
    region._count("backward: kernels")
    env = region.run(bw, inputs, needed=tuple(wanted), into=into, values=True)
    d_w = env[values["route_weights"]].to(wts.dtype) if needs[1] else None
    return [env[values["x"]] if needs[0] else None, d_w, *buffers]


def moec_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                         top_k_weights: Tensor) -> Tensor:
    """transformers' experts interface for ``experts_implementation="moec"`` (see the module doc)."""
    return serve(_region(self), self, _eager_forward(self), hidden_states, top_k_index, top_k_weights)


def serve(region: ExpertsRegion, m: nn.Module, eager, x: Tensor, ids: Tensor, wts: Tensor,
          reason: Optional[str] = None) -> Tensor:
    """The experts module ``m``'s output for ``(x, ids, wts)`` from ``region``'s kernels, or from ``eager`` (the
    forward to run otherwise; None: not found) with the reason counted (``reason``: the caller's already).
    Expert ids outside ``[0, E)`` (transformers' sentinel ``E`` of experts another rank holds) add nothing."""
    layout = None if reason else read_layout(m, x.shape[-1]) if isinstance(x, Tensor) else "input is not a tensor"
    reason = reason or ("moec.disabled() is active" if is_disabled() else layout if isinstance(layout, str) else None)
    if reason is None:
        w = layout.weights(m)
        reason = _why_eager(x, ids, wts, [t for t in w.values() if t is not None])
    reason = reason or empty_with_grad(x.shape[0])
    if reason is not None:
        if eager is None:
            raise RuntimeError(f"moec experts: {type(m).__name__} cannot run on moec's kernels ({reason}) and "
                               f"its eager forward was not found")
        return region.eager(reason, eager, x, ids, wts)
    leaves = layout.leaves(m)
    ids = torch.where((ids >= 0) & (ids < layout.E), ids, -1)      # (-1: a pair that adds nothing, never read)
    if torch.is_grad_enabled() and any(t.requires_grad for t in [x, wts, *leaves]):
        def kernels(ts):
            return run_kernels(region, ts[0], ids, ts[1], layout, layout.views(ts[2:]), saving=True)

        def backward(ts, saved, grads, needs):
            return kernels_backward(region, ts, saved, grads, needs, layout, ids.shape[1])

        return region.serve("kernels forward and backward", KernelsBoth.apply, kernels, backward, None,
                            x, wts, *leaves)[0]
    return region.serve("kernels", run_kernels, region, x, ids, wts, layout, w)
