"""A MoBA region at run time: the module's forward with its MoBA core running moec's kernels.

A `MobaRegion` is attached to a module whose forward uses ``topk`` (`moec.frontend.moba_lift`). It is
analysed once (at compile time when inputs can be made up, else at the first call); a lifted region
then keeps, per call signature (shapes, dtypes, devices, other argument values, training flag), the
forward traced for that signature with the core replaced by a `MobaCore` call. `MobaCore` runs the
compiled IR program (`moec.moba.compiler`): the fused gate and the block-sparse attention kernels.
Everything else in the forward (projections, reshapes, rotary, the output projection) runs as the
user's PyTorch ops, in the traced order.

What runs eagerly, and is counted for ``explain()``: a region that was not lifted (the reason is in the
report); a call whose signature has no liftable core or fails its probe; ``moec.disabled()``; cores in
float64, bfloat16 on CPU, or on other devices. With gradients, the kernels run the forward and the
backward recomputes the eager dense attention for the same selected blocks (`moba_attention_from_indices`
under autograd), as `moec.ops.moba_attention` does; the gate gets no gradient.
"""
from __future__ import annotations

import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moec.runtime import launch
from moec.runtime.arch import resolve

from . import reference
from .compiler import MobaCompiled, compile_moba

MAX_GRAPHS = 32          # specialised forwards kept per region (least recently used dropped)


class MobaCore(nn.Module):
    """Stands where the matched core was: q, k, v in their traced layouts -> the core's output."""

    def __init__(self, region: "MobaRegion", config, seq_dims: dict, out_dtype: torch.dtype):
        super().__init__()
        self.__dict__["region"] = region          # not a submodule
        self.config, self.seq_dims, self.out_dtype = config, dict(seq_dims), out_dtype

    def forward(self, q, k, v):
        sd = self.seq_dims
        q, k, v = (t if sd[r] == 2 else t.transpose(1, 2) for t, r in ((q, "q"), (k, "k"), (v, "v")))
        out = self.region.core(q, k, v, self.config)
        if sd["out"] == 1:
            out = out.transpose(1, 2).contiguous()
        return out.to(self.out_dtype)


class _MobaFunction(torch.autograd.Function):
    """Kernels forward; backward: autograd through the eager attention for the selected blocks."""

    @staticmethod
    def forward(ctx, compiled, q, k, v):
        values = compiled.program.run_values({"q": q.detach(), "k": k.detach(), "v": v.detach()})
        att = compiled.program.graph.find("block_sparse_attention")[0]
        ctx.save_for_backward(q, k, v, values[att.ins["indices"]])
        ctx.block_size = compiled.config.block_size
        return values[compiled.program.graph.outputs[0]]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, idx = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            out, _ = reference.moba_attention_from_indices(*leaves, idx, block_size=ctx.block_size)
            wanted = [t for t, n in zip(leaves, needs) if n]
            got = iter(torch.autograd.grad([out], wanted, [grad], allow_unused=True))
        return (None, *[next(got) if n else None for n in needs])


@dataclass
class MobaRegion:
    """One module's MoBA region. ``state``: pending (not analysed yet), lifted, eager (not lifted:
    ``reason``), or none (no MoBA core in it)."""

    name: str
    arch: Optional[str] = None
    dump_dir: Optional[Path] = None
    state: str = "pending"
    lifted: object = None
    reason: str = ""
    calls: Counter = field(default_factory=Counter)
    compiled: dict = field(default_factory=dict)
    graphs: OrderedDict = field(default_factory=OrderedDict)
    on_compile: Optional[object] = None
    _dumped: set = field(default_factory=set)
    takes_any_call = True                     # `moec.api` passes the call's args and kwargs through

    # ---- analysis ---------------------------------------------------------------------------
    def analyse(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        from moec.frontend.moba_lift import analyse
        try:
            self._settle(analyse(module, args, kwargs))
        except Exception as e:  # noqa: BLE001 - the frontend must not break a model eager PyTorch runs
            self.state, self.reason = "eager", f"analysis failed: {type(e).__name__}: {e}"

    def analyse_at_compile(self, module: nn.Module) -> None:
        """Analyse now with made-up inputs when their shape can be read off the module (one input,
        an ``nn.Linear`` giving its width); an inconclusive result waits for the first call."""
        from moec.frontend.moba_lift import analyse, synthesize_args
        try:
            args = synthesize_args(module)
            got = analyse(module, args, {}) if args is not None else None
        except Exception:  # noqa: BLE001 - made-up inputs that do not fit: wait for a real call
            got = None
        if got is not None and getattr(got, "final", True) and \
                not getattr(got, "reason", "").startswith("forward could not be traced"):
            self._settle(got)

    def _settle(self, got) -> None:
        from moec.frontend.moba_lift import LiftedMoba
        if isinstance(got, LiftedMoba):
            self.state, self.lifted = "lifted", got
        elif got is not None and not got.final:
            self.calls[f"eager: {got.reason}"] += 1          # still pending
        elif got is not None:
            self.state, self.reason = "eager", got.reason
        else:
            self.state = "none"
        if self.on_compile is not None:
            self.on_compile()

    # ---- calls ------------------------------------------------------------------------------
    def __call__(self, module, eager, *args, **kwargs):
        from moec.frontend.moba_lift import specialise
        from moec.frontend.moba_trace import TraceFailed, bind, signature
        from moec.region import _state
        if getattr(_state, "disabled", False):
            self.calls["eager: moec.disabled() is active"] += 1
            return eager(*args, **kwargs)
        if self.state == "pending":
            self.analyse(module, args, kwargs)
        if self.state != "lifted":
            if self.state == "eager":
                self.calls["eager: not lifted"] += 1
            return eager(*args, **kwargs)
        try:
            bound = bind(module, args, kwargs)
        except TraceFailed as e:
            self.calls[f"eager: {e}"] += 1
            return eager(*args, **kwargs)
        key = signature(module, bound)
        entry = self.graphs.get(key) if key is not None else "an argument moec cannot key a graph by"
        if entry is None:
            got = specialise(module, bound, self.lifted)
            entry = got if isinstance(got, str) else self._rewrite(*got)
            self.graphs[key] = entry
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        elif key is not None:
            self.graphs.move_to_end(key)
        if isinstance(entry, str):
            self.calls[f"eager: {entry}"] += 1
            return eager(*args, **kwargs)
        return entry(*bound.values)

    def _rewrite(self, tr, m):
        import dataclasses
        from moec.frontend.moba_lift import rewrite
        from moec.frontend.moba_match import val
        tq, tk = val(m.q), val(m.k)
        qs, ks = m.seq_dims["q"], m.seq_dims["k"]
        cfg = dataclasses.replace(self.lifted.config, heads=int(tq.shape[3 - qs]), kv_heads=int(tk.shape[3 - ks]),
                                  head_dim=int(tq.shape[3]))
        return rewrite(tr, m, MobaCore(self, cfg, m.seq_dims, val(m.out).dtype))

    def core(self, q, k, v, config) -> torch.Tensor:
        c = self.compiled_for(q, config)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            self.calls["kernels forward, eager backward"] += 1
            return _MobaFunction.apply(c, q, k, v)
        self.calls["kernels"] += 1
        if self.dump_dir is not None and id(c) not in self._dumped:
            self._dumped.add(id(c))
            with launch.recording() as records:
                out = c.program.run({"q": q, "k": k, "v": v})[0]
            doc = {"B": q.shape[0], "T": q.shape[2], "launches": [r.describe() for r in records]}
            (self._dump_path(c) / "launches.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
            return out
        return c.program.run({"q": q, "k": k, "v": v})[0]

    def compiled_for(self, q: torch.Tensor, config) -> MobaCompiled:
        arch = resolve(self.arch, q.device)
        key = (config, q.dtype, arch)
        if key not in self.compiled:
            c = compile_moba(config, q.dtype, arch)
            self.compiled[key] = c
            if self.dump_dir is not None:
                c.dump(self._dump_path(c), self.captured())
            if self.on_compile is not None:
                self.on_compile()
        return self.compiled[key]

    def _dump_path(self, c: MobaCompiled) -> Path:
        cfg = c.config
        heads = "" if cfg == self.lifted.config else f".h{cfg.heads}kv{cfg.kv_heads}d{cfg.head_dim}"
        d = self.dump_dir / f"{self.name}.{str(c.dtype).split('.')[-1]}.{c.arch.name}{heads}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def captured(self) -> str:
        """What the frontend read off the module, and the rewritten forward of the latest signature."""
        lines = [f"region {self.name}: {self.lifted.formulation}", f"config: {self.lifted.config}",
                 f"layouts (sequence dim per role): {self.lifted.seq_dims}"]
        lines += [f"note: {n}" for n in self.lifted.notes]
        gms = [g for g in self.graphs.values() if not isinstance(g, str)]
        if gms:
            lines += ["", "rewritten forward (latest call signature):", gms[-1].code.strip()]
        return "\n".join(lines) + "\n"

    # ---- report -----------------------------------------------------------------------------
    def report(self, qualname: str, cls: str) -> list[str]:
        where = f"{qualname or '<root>'} ({cls})"
        if self.state == "pending":
            return [f"  PENDING {where}: MoBA candidate (its forward uses topk); analysed at its first call"]
        if self.state == "eager":
            return [f"  EAGER   {where}: MoBA core not lifted: {self.reason}"] + self._call_lines()
        if self.state != "lifted":
            return []
        lf = self.lifted
        lines = [f"  LIFTED  {where}: {lf.formulation}", f"          {lf.config.describe()}"]
        lines += [f"          {n}" for n in lf.notes]
        gms = [g for g in self.graphs.values() if not isinstance(g, str)]
        if gms:
            from moec.frontend.moba_lift import eager_modules
            kept = eager_modules(gms[-1])
            lines.append(f"          the rest of forward stays PyTorch ({len(self.graphs)} specialised call "
                         f"signature(s))" + (f"; eager submodules: {', '.join(kept)}" if kept else ""))
        for (cfg, dtype, arch), c in self.compiled.items():
            heads = "" if cfg == lf.config else f" (heads {cfg.heads}/{cfg.kv_heads}, head_dim {cfg.head_dim})"
            lines.append(f"          compiled for {str(dtype).split('.')[-1]} on {arch.name}{heads}: "
                         f"{c.describe_kernels()} (keys pooled by a torch op)")
        lines.append("          backward: when gradients are needed the kernels run the forward and the backward "
                     "is eager PyTorch (the same selected blocks)")
        return lines + self._call_lines()

    def _call_lines(self) -> list[str]:
        return [f"          calls: {n} x {what}" for what, n in sorted(self.calls.items())]
