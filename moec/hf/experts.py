"""``experts_implementation="moec"``: transformers' expert computation on moec's kernels.

transformers 5 decorates its experts modules with ``@use_experts_implementation``: the MoE block's
router computes ``top_k_index [T, k]`` and ``top_k_weights [T, k]``, and the experts module's
forward dispatches on ``config._experts_implementation`` to a function
``(experts, hidden_states [T, d], top_k_index, top_k_weights) -> [T, d]``. `moec_experts_forward`
is that function for ``"moec"``:

- it reads the stacked expert weights as views, without copies (``gate_up_proj [E, 2f, d]``, gate
  first, or ``[E, d, 2f]`` when the class is ``is_transposed``; ``down_proj [E, d, f]`` / ``[E, f, d]``;
  ``up_proj`` alone for ungated experts), and the activation by evaluating ``act_fn``;
- it builds, once per (E, k, d, f, activation, dtype, arch), the IR graph of the routed experts
  alone (no router: ids and weights are graph inputs) — dispatch, permute, gate/up/down grouped
  GEMMs, activation, weighted combine — and runs moec's pass pipeline and lowering on it, so the
  program is the same three generated kernels the experts of a lifted layer run: grouped GEMM with
  gather + GLU epilogue, grouped GEMM with scale + scatter epilogue, deterministic top-k reduce;
- with gradients needed, the forward runs the kernels and the backward recomputes an eager
  reference under autograd (gradients for hidden states, routing weights and expert weights).

What it cannot serve runs the experts module's own eager forward (the ``"eager"`` implementation),
counted per reason (`calls`): per-expert biases, a custom gate (``_apply_gate`` overridden, e.g.
GPT-OSS's clamped SwiGLU), an activation that is none of moec's, a post-expert norm, expert
parallelism, and inputs the kernels do not take (float64, bf16 on a CPU, mixed dtypes/devices).
``MOEC_DUMP_DIR`` receives each program's IR stages and kernels under ``hf_experts.*``.
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

from moec import reference
from moec.compiler import Compiled
from moec.frontend.adapters import activation_of
from moec.ir.graph import Builder, Graph
from moec.ir.text import print_graph
from moec.ir.types import T, TensorType, dtype_name
from moec.passes.lower import lower
from moec.passes.pipeline import PassContext, run_passes
from moec.runtime.arch import Arch, arch_of

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- the program ------------------------------------------------------------------------------

def build_experts_graph(E: int, k: int, d: int, f: int, activation: str, glu: bool, dtype) -> Graph:
    """The routed experts of an MoE layer, given the routing: ``y[t] = sum_s weights[t, s] *
    expert_{ids[t, s]}(x[t])``; graph inputs ``x, ids, weights, [w_gate,] w_up, w_down``."""
    dt = dtype_name(dtype)
    b = Builder("hf_experts")
    x = b.input("x", TensorType(dt, (T, d)))
    ids = b.input("ids", TensorType("i32", (T, k)))
    weights = b.input("weights", TensorType("f32", (T, k)))
    w_gate = b.input("w_gate", TensorType(dt, (E, f, d))) if glu else None
    w_up = b.input("w_up", TensorType(dt, (E, f, d)))
    w_down = b.input("w_down", TensorType(dt, (E, d, f)))
    disp = b.add("dispatch", {"ids": ids}, {"num_experts": E})
    xs = b.add("permute", {"x": x, "order": disp["order"]}, {"top_k": k}, names={"out": "xs"})["out"]
    proj = {"num_experts": E}
    up = b.add("grouped_gemm", {"a": xs, "w": w_up, "offsets": disp["offsets"]}, proj, names={"out": "up"})["out"]
    gate = (b.add("grouped_gemm", {"a": xs, "w": w_gate, "offsets": disp["offsets"]}, proj,
                  names={"out": "gate"})["out"] if glu else None)
    h = b.add("activate", {"gate": gate or up, "up": up if glu else None},
              {"activation": activation, "glu": glu}, names={"out": "h"})["out"]
    ys = b.add("grouped_gemm", {"a": h, "w": w_down, "offsets": disp["offsets"]}, proj, names={"out": "ys"})["out"]
    y = b.add("combine", {"y": ys, "order": disp["order"], "weights": weights, "ids": ids}, {"top_k": k},
              names={"out": "routed"})["out"]
    y = b.add("cast", {"x": y}, {"dtype": dt}, names={"out": "y"})["out"]
    return b.graph([y])


def program_name(E: int, k: int, d: int, f: int, activation: str, glu: bool, dtype, arch: Arch) -> str:
    return (f"hf_experts.E{E}.k{k}.d{d}.f{f}.{activation}{'_glu' if glu else ''}."
            f"{str(dtype).replace('torch.', '')}.{arch.name}")


@functools.lru_cache(maxsize=128)
def experts_program(E: int, k: int, d: int, f: int, activation: str, glu: bool, dtype: torch.dtype,
                    arch: Arch) -> Compiled:
    """Build, optimise and lower the routed-experts graph (memoised); a `Compiled` without a spec,
    whose ``stages`` hold the IR after each pass and ``program`` the kernels."""
    graph = build_experts_graph(E, k, d, f, activation, glu, dtype)
    out = Compiled(None, dtype, arch, [("captured", print_graph(graph))])
    final = run_passes(graph, PassContext(arch), after=lambda name, g: out.stages.append((name, print_graph(g))))
    out.program = lower(final, arch.name)
    dump = os.environ.get("MOEC_DUMP_DIR")
    if dump:
        out.dump(Path(dump) / program_name(E, k, d, f, activation, glu, dtype, arch))
    return out


# ---- reading an experts module ----------------------------------------------------------------

@dataclass(frozen=True)
class ExpertsLayout:
    """How one transformers experts module stores its weights (shapes fixed at first use)."""

    E: int
    d: int
    f: int
    glu: bool
    activation: str
    transposed: bool

    def weights(self, m: nn.Module) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """``(w_gate, w_up, w_down)`` as ``[E, f, d]``, ``[E, f, d]``, ``[E, d, f]`` views."""
        tr = (lambda t: t.transpose(1, 2)) if self.transposed else (lambda t: t)   # noqa: E731
        down = tr(m.down_proj)
        if self.glu:
            gu = tr(m.gate_up_proj)
            return gu[:, :self.f], gu[:, self.f:], down
        return None, tr(m.up_proj), down


def _default_gate(m: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except Exception:  # noqa: BLE001 - another transformers layout: do not guess
        return False
    return getattr(type(m), "_apply_gate", None) is _default_apply_gate


def read_layout(m: nn.Module, d: int):
    """The `ExpertsLayout` of experts module ``m`` for hidden size ``d``, or the reason it has none."""
    if getattr(m, "has_bias", False):
        return "per-expert biases"
    if getattr(m, "has_post_expert_norm", False):
        return "a post-expert norm"
    if getattr(m, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    glu = bool(getattr(m, "has_gate", True))
    if glu and not _default_gate(m):
        return f"a custom gate ({type(m).__name__}._apply_gate)"
    act_fn = getattr(m, "act_fn", None)
    cached = m.__dict__.get("_moec_activation")
    if cached is not None and cached[0] is act_fn:
        act = cached[1]
    else:
        act = activation_of(act_fn) if act_fn is not None else None
        m.__dict__["_moec_activation"] = (act_fn, act)
    if act is None:
        return f"activation {type(act_fn).__name__} (moec's experts compute silu, gelu, gelu_tanh or relu)"
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
    return ExpertsLayout(E, d, f, glu, act, transposed)


# ---- the forward ------------------------------------------------------------------------------

def _why_eager(x: Tensor, ids: Tensor, wts: Tensor, tensors) -> Optional[str]:
    if x.dim() != 2 or ids.dim() != 2 or wts.shape != ids.shape or ids.shape[0] != x.shape[0]:
        return f"inputs of shapes {tuple(x.shape)}, {tuple(ids.shape)}, {tuple(wts.shape)}"
    if x.dtype not in KERNEL_DTYPES:
        return f"input dtype {x.dtype}"
    if x.device.type not in ("cpu", "cuda"):
        return f"input on device {x.device}"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return "bfloat16 on CPU (the Triton interpreter computes bf16 dots wrongly)"
    for t in tensors:
        if t.device != x.device or t.dtype != x.dtype:
            return f"weights {t.dtype} on {t.device}, input {x.dtype} on {x.device}"
    if wts.device != x.device or ids.device != x.device:
        return "routing tensors on another device"
    return None


def _count(m: nn.Module, what: str) -> None:
    calls = m.__dict__.get("_moec_calls")
    if calls is None:
        calls = m.__dict__["_moec_calls"] = Counter()
    calls[what] += 1


def calls(model: nn.Module) -> Counter:
    """How the experts modules under ``model`` ran with ``experts_implementation="moec"``:
    ``"kernels"``, ``"kernels forward, eager backward"`` or ``"eager: <reason>"``, summed."""
    total: Counter = Counter()
    for m in model.modules():
        total.update(m.__dict__.get("_moec_calls") or {})
    return total


def _eager_forward(m: nn.Module):
    for cls in type(m).__mro__:
        fwd = cls.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__wrapped__", None) is not None:
            return functools.partial(fwd.__wrapped__, m)
    return None


def run_kernels(x: Tensor, ids: Tensor, wts: Tensor, layout: ExpertsLayout, w_gate, w_up, w_down) -> Tensor:
    k = ids.shape[1]
    prog = experts_program(layout.E, k, layout.d, layout.f, layout.activation, layout.glu, x.dtype,
                           arch_of(x.device))
    inputs = {"x": x if x.stride(-1) == 1 else x.contiguous(), "ids": ids.to(torch.int32).contiguous(),
              "weights": wts.to(torch.float32).contiguous(), "w_up": w_up, "w_down": w_down}
    if layout.glu:
        inputs["w_gate"] = w_gate
    (y,) = prog.program.run(inputs)
    return y


def reference_experts(x: Tensor, ids: Tensor, wts: Tensor, layout: ExpertsLayout, w_gate, w_up, w_down) -> Tensor:
    """The same result in plain torch (differentiable; fp32 arithmetic, like the kernels)."""
    xf = x.float()
    y = torch.zeros_like(xf)
    for e in range(layout.E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            out = reference.expert_mlp(xf[tok], w_up[e], w_down[e], w_gate[e] if layout.glu else None,
                                       layout.activation)
            y = y.index_add(0, tok, out * wts[tok, slot, None].float())
    return y.to(x.dtype)


class _ExpertsFunction(torch.autograd.Function):
    """Kernels forward; backward = autograd through `reference_experts` on the saved inputs."""

    @staticmethod
    def forward(ctx, layout, ids, x, wts, w_gate, w_up, w_down):
        ctx.layout = layout
        ctx.has_gate = w_gate is not None
        ctx.save_for_backward(ids, x, wts, w_gate if w_gate is not None else torch.empty(0), w_up, w_down)
        return run_kernels(x.detach(), ids, wts.detach(), layout,
                           w_gate.detach() if w_gate is not None else None, w_up.detach(), w_down.detach())

    @staticmethod
    def backward(ctx, grad):
        ids, *leaves = ctx.saved_tensors
        if not ctx.has_gate:
            leaves[2] = None
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            det = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(leaves, needs)]
            y = reference_experts(det[0], ids, det[1], ctx.layout, *det[2:])
            wanted = [t for t, n in zip(det, needs) if n and t is not None]
            got = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True) if wanted else [])
        return (None, None, *[next(got) if n and t is not None else None for t, n in zip(det, needs)])


def moec_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                         top_k_weights: Tensor) -> Tensor:
    """transformers' experts interface for ``experts_implementation="moec"`` (see the module doc)."""
    x, ids, wts = hidden_states, top_k_index, top_k_weights
    layout = read_layout(self, x.shape[-1]) if isinstance(x, Tensor) else "input is not a tensor"
    reason = layout if isinstance(layout, str) else None
    if reason is None:
        w_gate, w_up, w_down = layout.weights(self)
        reason = _why_eager(x, ids, wts, [t for t in (w_gate, w_up, w_down) if t is not None])
    if reason is not None:
        eager = _eager_forward(self)
        if eager is None:
            raise RuntimeError(f"moec experts: {type(self).__name__} cannot run on moec's kernels ({reason}) and "
                               f"its eager forward was not found")
        _count(self, f"eager: {reason}")
        return eager(hidden_states, top_k_index, top_k_weights)
    tensors = [x, wts, w_up, w_down] + ([w_gate] if w_gate is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        _count(self, "kernels forward, eager backward")
        return _ExpertsFunction.apply(layout, ids, x, wts, w_gate, w_up, w_down)
    _count(self, "kernels")
    return run_kernels(x, ids, wts, layout, w_gate, w_up, w_down)
