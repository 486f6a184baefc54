"""A lifted MoE region at run time: validate the call, bind weights, run kernels, pack outputs.

A call the kernels cannot serve (an unsupported dtype or device, bf16 under the CPU
interpreter, moec disabled) runs the module's own eager forward, and the region counts why,
so `explain()` can say it. When gradients are needed, the forward still runs the kernels and
the backward recomputes the eager reference under autograd (exact gradients, eager speed).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moec.runtime import autotune, launch
from moec.runtime.arch import resolve

from . import reference
from .compiler import Compiled, compile_spec
from .spec import MoEWeights

_state = threading.local()
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def disabled():
    """Run every compiled region as its original eager code inside this block."""
    old = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = old


def graph_inputs(x: torch.Tensor, w: MoEWeights) -> dict[str, torch.Tensor]:
    """IR graph inputs (named after MoEWeights fields) for one call."""
    named = {"x": x, "w_router": w.w_router, "b_router": w.b_router, "w_noise": w.w_noise,
             "w_gate": w.w_gate, "w_up": w.w_up, "w_down": w.w_down,
             "score_bias": w.score_bias.float() if w.score_bias is not None else None,
             "shared_up": w.shared_up, "shared_gate": w.shared_gate, "shared_down": w.shared_down,
             "shared_gate_proj": w.shared_gate_proj, "b_gate": w.b_gate, "b_up": w.b_up, "b_down": w.b_down}
    for k in ("shared_up", "shared_gate", "shared_down"):
        if named[k] is not None:
            named[k] = named[k].unsqueeze(0)
    return {k: v for k, v in named.items() if v is not None}


@dataclass
class Region:
    """One lifted module. ``lifted`` is the frontend's `LiftedMoE`."""

    name: str
    lifted: object
    arch: Optional[str] = None
    dump_dir: Optional[Path] = None
    calls: Counter = field(default_factory=Counter)
    compiled: dict = field(default_factory=dict)
    lift_dtype: Optional[torch.dtype] = None    # the layer's dtype when it was lifted
    on_compile: Optional[object] = None    # called after each new compile (rewrites explain.txt)
    _generations: dict = field(default_factory=dict)   # (dtype, arch) -> tune generation compiled at
    _weights_key: tuple = ()
    _weights: Optional[MoEWeights] = None

    @property
    def spec(self):
        return self.lifted.spec

    @property
    def outputs(self) -> tuple[str, ...]:
        return {"y": ("y",), "y_logits": ("y", "logits"), "y_aux": ("y", "aux"),
                "y_weights": ("y", "weights")}[self.lifted.outputs]

    # ---- eligibility ------------------------------------------------------------------------
    def why_eager(self, x, tensors) -> Optional[str]:
        if getattr(_state, "disabled", False):
            return "moec.disabled() is active"
        if not isinstance(x, torch.Tensor):
            return f"input is {type(x).__name__}, not a tensor"
        if x.dtype not in KERNEL_DTYPES:
            return f"input dtype {x.dtype} (kernels take float32, float16, bfloat16)"
        if x.device.type not in ("cpu", "cuda"):
            return f"input on device {x.device}"
        for t in tensors:
            if t.device != x.device:
                return f"weights on {t.device}, input on {x.device}"
            if t.is_floating_point() and t.dtype != x.dtype and t.dtype != torch.float32:
                return f"weights in {t.dtype}, input in {x.dtype}"
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            return "bfloat16 on CPU (the Triton interpreter computes bf16 dots wrongly)"
        return None

    def weights(self, tensors) -> MoEWeights:
        """The layer's weights; stacked copies are rebuilt only when a parameter changed."""
        key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        if key != self._weights_key:
            with torch.no_grad():
                self._weights = self.lifted.weights(tensors)
            self._weights_key = key
        return self._weights

    def compiled_for(self, x: torch.Tensor) -> Compiled:
        """The program for ``x``'s dtype and device, compiled at the first call and again (once)
        after the tune file changed in this process (`autotune.invalidate`, which `moec.tune`
        and `autotune.tune` call), so a tuned module never keeps its old tiles silently."""
        arch = resolve(self.arch, x.device)   # an explicit arch on a CPU picks its tiles, run interpreted
        key = (x.dtype, arch)
        generation = autotune.generation()
        if key not in self.compiled or self._generations.get(key) != generation:
            c = compile_spec(self.spec, x.dtype, self.outputs, arch)
            self.compiled[key] = c
            self._generations[key] = generation
            if self.dump_dir is not None:
                c.dump(self.dump_dir / f"{self.name}.{str(x.dtype).split('.')[-1]}.{arch.name}",
                       self.captured())
            if self.on_compile is not None:
                self.on_compile()
        return self.compiled[key]

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
        reason = self.why_eager(x, tensors) if not args and not kwargs else "extra forward arguments"
        if reason is None and x.shape[-1] != self.spec.hidden:
            raise ValueError(f"moec region {self.name!r}: expects hidden size {self.spec.hidden} on the "
                             f"last dim, got input of shape {tuple(x.shape)}")
        if reason is not None:
            self.calls[f"eager: {reason}"] += 1
            return eager_forward(x, *args, **kwargs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        _call_observed(module, getattr(self.lifted, "observed", ()), x2)
        noise = None
        if self.spec.router.noisy and module.training:
            dtype = self.lifted.noise_dtype or x.dtype
            if dtype == self.lift_dtype:        # eager draws in the layer's dtype, which follows .to()
                dtype = x.dtype
            noise = torch.randn(x2.shape[0], self.spec.num_experts, dtype=dtype, device=x.device)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))
        if needs_grad:
            self.calls["kernels forward, eager backward"] += 1
            outs = _MoEFunction.apply(self, module.training, noise, x2, *tensors)
        else:
            self.calls["kernels"] += 1
            outs = self.run(x2, tensors, module.training, noise)
        y = outs[0].reshape(*lead, x.shape[-1])
        if len(outs) == 1:
            return y
        extra = outs[1].to(x.dtype) if self.outputs[1] in ("logits", "weights") else outs[1]
        return (y, extra)

    def run(self, x2, tensors, training, noise):
        c = self.compiled_for(x2)
        inputs = graph_inputs(x2.contiguous() if x2.stride(-1) != 1 else x2, self.weights(tensors))
        if self.dump_dir is not None and not getattr(c, "_launches_dumped", False):
            with launch.recording() as records:
                outs = c.program.run(inputs, training=training, noise=noise)
            _dump_launches(self.dump_dir, self.name, x2, c, records)
            c._launches_dumped = True
            return outs
        return c.program.run(inputs, training=training, noise=noise)

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


def _hooked(m: torch.nn.Module) -> bool:
    from torch.nn.modules import module as mm
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


def _dump_launches(root: Path, name: str, x2, c: Compiled, records) -> None:
    import json
    d = root / f"{name}.{str(x2.dtype).split('.')[-1]}.{c.arch.name}"
    d.mkdir(parents=True, exist_ok=True)
    doc = {"T": int(x2.shape[0]), "launches": [r.describe() for r in records]}
    (d / "launches.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")


class _MoEFunction(torch.autograd.Function):
    """Kernels forward; backward = autograd through the eager reference on saved inputs."""

    @staticmethod
    def forward(ctx, region, training, noise, x2, *tensors):
        ctx.region, ctx.training = region, training
        ctx.save_for_backward(x2, noise if noise is not None else torch.empty(0), *tensors)
        ctx.has_noise = noise is not None
        outs = region.run(x2.detach(), [t.detach() for t in tensors], training, noise)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, noise, *tensors = ctx.saved_tensors
        noise = noise if ctx.has_noise else None
        leaves = [x2] + tensors
        needs = [ctx.needs_input_grad[3 + i] for i in range(len(leaves))]
        with torch.enable_grad():
            detached = [t.detach().requires_grad_(n) for t, n in zip(leaves, needs)]
            outs = ctx.region.reference(detached[0], detached[1:], ctx.training, noise)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o is not None and o.requires_grad]
            wanted = [t for t, n in zip(detached, needs) if n]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                      allow_unused=True) if pairs and wanted else [None] * len(wanted)
        it = iter(got)
        result = [next(it) if n else None for n in needs]
        return (None, None, None, *result)
