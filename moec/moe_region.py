"""A lifted MoE layer at run time: validate the call, bind weights, run kernels, pack outputs.

A call the kernels cannot serve (an unsupported dtype or device, bf16 under the CPU
interpreter, moec disabled) runs the module's own eager forward, and the region counts why,
so `explain()` can say it. When gradients are needed, the forward still runs the kernels and
the backward recomputes the eager reference under autograd (exact gradients, eager speed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.modules import module as mm

from moec.ir.build import moe_inputs
from moec.runtime.autograd import KernelsForward
from moec.runtime.support import why_not_kernels

from . import reference
from .compiler import MoERecipe
from .region import Region, is_disabled
from .spec import MoEWeights

OUTPUTS = {"y": ("y",), "y_logits": ("y", "logits"), "y_aux": ("y", "aux"), "y_weights": ("y", "weights")}


@dataclass(eq=False)
class MoERegion(Region):
    """One lifted MoE module. ``lifted`` is the frontend's `LiftedMoE`."""

    lifted: object = None
    lift_dtype: Optional[torch.dtype] = None    # the layer's dtype when it was lifted
    _weights_key: tuple = ()
    _weights: Optional[MoEWeights] = None

    @property
    def spec(self):
        return self.lifted.spec

    @property
    def outputs(self) -> tuple[str, ...]:
        return OUTPUTS[self.lifted.outputs]

    @property
    def recipe(self) -> MoERecipe:
        return MoERecipe(self.spec, self.outputs)

    def weights(self, tensors) -> MoEWeights:
        """The layer's weights; stacked copies are rebuilt only when a parameter changed."""
        key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        if key != self._weights_key:
            with torch.no_grad():
                self._weights = self.lifted.weights(tensors)
            self._weights_key = key
        return self._weights

    def captured(self) -> str:
        """What the frontend read off the module: formulation, spec, weight bindings, notes."""
        lines = [f"region {self.name}: {self.lifted.formulation}", f"spec: {self.spec}",
                 f"outputs: {self.lifted.outputs}"]
        paths = getattr(self.lifted.param_tensors, "paths", None)
        describe = getattr(self.lifted.weights, "describe", None)
        if paths is not None and describe is not None:
            lines += ["weights:"] + [f"  {line}" for line in describe(paths)]
        lines += [f"note: {n}" for n in self.lifted.notes]
        return "\n".join(lines) + "\n"

    # ---- calls ------------------------------------------------------------------------------
    def __call__(self, module, eager_forward, x, *args, **kwargs):
        tensors = list(self.lifted.param_tensors(module))
        if is_disabled():
            reason = "moec.disabled() is active"
        else:
            reason = why_not_kernels(x, tensors, fp32_ok=True) if not args and not kwargs else "extra forward arguments"
        if reason is None and x.shape[-1] != self.spec.hidden:
            raise ValueError(f"moec region {self.name!r}: expects hidden size {self.spec.hidden} on the "
                             f"last dim, got input of shape {tuple(x.shape)}")
        if reason is not None:
            return self.eager(reason, eager_forward, x, *args, **kwargs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        _call_observed(module, getattr(self.lifted, "observed", ()), x2)
        noise = None
        training = module.training
        if self.spec.router.noisy and training:
            dtype = self.lifted.noise_dtype or x.dtype
            if dtype == self.lift_dtype:        # eager draws in the layer's dtype, which follows .to()
                dtype = x.dtype
            noise = torch.randn(x2.shape[0], self.spec.num_experts, dtype=dtype, device=x.device)
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
            outs = self.serve("kernels forward, eager backward", KernelsForward.apply,
                              lambda ts: self.kernels(ts[0], ts[1:], training, noise),
                              lambda ts, _: self.reference(ts[0], ts[1:], training, noise), (), x2, *tensors)
        else:
            outs = self.serve("kernels", self.kernels, x2, tensors, training, noise)
        y = outs[0].reshape(*lead, x.shape[-1])
        if len(outs) == 1:
            return y
        extra = outs[1].to(x.dtype) if self.outputs[1] in ("logits", "weights") else outs[1]
        return (y, extra)

    def kernels(self, x2, tensors, training, noise):
        c = self.compiled_for(self.recipe, x2.dtype, x2.device)
        inputs = moe_inputs(x2.contiguous() if x2.stride(-1) != 1 else x2, self.weights(tensors))
        return self.run(c, inputs, training=training, noise=noise)

    def reference(self, x2, tensors, training, noise):
        """The same outputs from the eager reference (differentiable)."""
        w = self.lifted.weights(tensors)
        y, aux = reference.moe(x2, w, self.spec, noise=noise if training else None)
        out = {"y": y, "aux": aux,
               "logits": lambda: reference.router_logits(x2, w.w_router, w.b_router),
               "weights": lambda: reference.route(reference.router_logits(
                   x2, w.w_router, w.b_router, w.w_noise, noise if training else None),
                   self.spec.router, w.score_bias)[1]}
        return [out[o]() if callable(out[o]) else out[o] for o in self.outputs]

    # ---- report -----------------------------------------------------------------------------
    def report(self, qualname: str, cls: str) -> list[str]:
        lines = [f"LIFTED  {qualname or '<root>'} ({cls}): {self.lifted.formulation}", f"        {_spec_line(self.spec)}"]
        lines += [f"        {note}" for note in getattr(self.lifted, "notes", []) if note.startswith(_SHOWN_NOTES)]
        lines += [f"        {line}" for line in self.program_lines()]
        lines.append("        backward: when gradients are needed the forward runs the kernels and "
                     "the backward runs eager PyTorch (autograd through the reference)")
        return lines + [f"        {line}" for line in self.call_lines()]


_SHOWN_NOTES = ("traced router path", "experts:", "shared expert", "probe:")   # the rest: captured.txt


def _spec_line(spec) -> str:
    r = spec.router
    bits = [f"{r.num_experts} experts", f"top-{r.top_k}", r.score]
    if r.order == "topk_then_score":
        bits.append("top-k then softmax")
    if r.renormalize:
        bits.append("renormalised")
    if r.routed_scaling != 1.0:
        bits.append(f"scaled x{r.routed_scaling:g}")
    if r.score_bias:
        bits.append("selection bias")
    if r.n_group > 1:
        bits.append(f"group-limited {r.topk_group}/{r.n_group} ({r.group_score})")
    if r.capacity_factor is not None:
        bits.append(f"capacity {r.capacity_factor:g} ({r.overflow})")
    if r.noisy:
        bits.append("noisy gating")
    if r.aux_loss:
        bits.append("aux loss")
    if r.router_bias:
        bits.append("router bias")
    act = ("SwiGLU" if spec.activation == "silu" else f"{spec.activation} GLU") if spec.glu else spec.activation
    variant = [f"{k}={v:g}" for k, v in spec.glu_variant.items()]
    if variant:
        act += f" ({', '.join(variant)})"
    bits.append(f"{act} experts{' with biases' if spec.expert_bias else ''} d={spec.hidden} f={spec.ffn}")
    if spec.shared is not None:
        bits.append(f"shared expert f={spec.shared.width}" + (" (sigmoid-gated)" if spec.shared.gated else ""))
    return ", ".join(bits)


def _hooked(m: torch.nn.Module) -> bool:
    if mm._global_forward_hooks or mm._global_forward_pre_hooks:
        return True
    return any(s._forward_hooks or s._forward_pre_hooks for s in m.modules())


def _call_observed(module, paths, x2) -> None:
    """Call the observed children (the router) that have forward hooks, so that the hooks still see
    their outputs (Hugging Face records router logits with hooks); results are discarded."""
    for path in paths:
        sub = module.get_submodule(path)
        if _hooked(sub):
            sub(x2)

