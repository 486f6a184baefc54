"""A MoBA region at run time: the module's forward with its MoBA core running moec's kernels.

A `MobaRegion` is attached to a module whose forward uses ``topk`` (`moec.frontend.moba_lift`). It is
analysed once (at compile time when inputs can be made up, else at the first call); a lifted region
then keeps, per call signature (shapes, dtypes, devices, other argument values, training flag), the
forward traced for that signature with the core replaced by a `MobaCore` call. `MobaCore` runs the
compiled IR program (`moec.compiler.MobaRecipe`): the fused gate and the block-sparse attention kernels.
Everything else in the forward (projections, reshapes, rotary, the output projection) runs as the
user's PyTorch ops, in the traced order.

What runs eagerly, and is counted for ``explain()``: a region that was not lifted (the reason is in the
report); a call whose signature has no liftable core or fails its probe; ``moec.disabled()``; cores in
float64, bfloat16 on CPU, or on other devices. With gradients, the backward runs generated kernels over
the blocks the forward selected, from its saved out and lse (`moec.ir.backward.build_moba_backward_graph`),
as `moec.ops.moba_attention` does; the gate gets no gradient.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from moec.frontend.moba_candidates import synthesize_args
from moec.frontend.moba_lift import LiftedMoba, analyse, eager_modules, from_bhnd, rewrite, specialise, to_bhnd
from moec.frontend.fx_ops import val
from moec.frontend.moba_match import heads
from moec.frontend.trace import TraceFailed, bind, signature
from moec.runtime.autograd import KernelsBoth

from .compiler import BackwardRecipe, Compiled, MobaRecipe
from .region import Region, is_disabled

MAX_GRAPHS = 32          # specialised forwards kept per region (least recently used dropped)
MAX_PENDING = 8          # calls that cannot tell (N = 1, one block...) analysed before the region settles eager


class MobaCore(nn.Module):
    """Stands where the matched core was: q, k, v in their traced layouts -> the core's output."""

    def __init__(self, region: "MobaRegion", config, seq_dims: dict, out_dtype: torch.dtype):
        super().__init__()
        self.__dict__["region"] = region          # not a submodule
        self.config, self.seq_dims, self.out_dtype = config, dict(seq_dims), out_dtype

    def forward(self, q, k, v):
        sd, rank = self.seq_dims, q.dim()
        q, k, v = (to_bhnd(t, sd[r]) for t, r in ((q, "q"), (k, "k"), (v, "v")))
        out = from_bhnd(self.region.core(q, k, v, self.config), sd["out"], rank)
        return (out if sd["out"] == 2 else out.contiguous()).to(self.out_dtype)


@dataclass(eq=False)
class MobaRegion(Region):
    """One module's MoBA region. ``state``: pending (not analysed yet), lifted, eager (not lifted:
    ``reason``), or none (no MoBA core in it)."""

    state: str = "pending"
    lifted: object = None
    reason: str = ""
    graphs: OrderedDict = field(default_factory=OrderedDict)
    pending_tries: int = 0
    takes_any_call = True                     # `moec.api` passes the call's args and kwargs through

    # ---- analysis ---------------------------------------------------------------------------
    def analyse(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            self._settle(analyse(module, args, kwargs))
        except Exception as e:  # noqa: BLE001 - the frontend must not break a model eager PyTorch runs
            self.state, self.reason = "eager", f"analysis failed: {type(e).__name__}: {e}"

    def analyse_at_compile(self, module: nn.Module) -> None:
        """Analyse now with made-up inputs when their shape can be read off the module (one input,
        an ``nn.Linear`` giving its width); an inconclusive result waits for the first call."""
        try:
            args = synthesize_args(module)
            got = analyse(module, args, {}) if args is not None else None
        except Exception:  # noqa: BLE001 - made-up inputs that do not fit: wait for a real call
            got = None
        if got is not None and getattr(got, "final", True) and \
                not getattr(got, "reason", "").startswith("forward could not be traced"):
            self._settle(got)

    def _settle(self, got) -> None:
        if isinstance(got, LiftedMoba):
            self.state, self.lifted = "lifted", got
        elif got is not None and not got.final and self.pending_tries < MAX_PENDING:
            self.calls[f"eager: {got.reason}"] += 1          # still pending
            self.pending_tries += 1
        elif got is not None:
            self.state, self.reason = "eager", got.reason
        else:
            self.state = "none"
        if self.on_compile is not None:
            self.on_compile()

    # ---- calls ------------------------------------------------------------------------------
    def __call__(self, module, eager, *args, **kwargs):
        if is_disabled():
            return self.eager("moec.disabled() is active", eager, *args, **kwargs)
        if self.state == "pending":
            self.analyse(module, args, kwargs)
        if self.state != "lifted":
            if self.state == "eager":
                self.calls["eager: not lifted"] += 1
            return eager(*args, **kwargs)
        try:
            bound = bind(module, args, kwargs)
        except TraceFailed as e:
            return self.eager(str(e), eager, *args, **kwargs)
        key = signature(module, bound, self.lifted.host)
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
            return self.eager(entry, eager, *args, **kwargs)
        return entry(*bound.values)

    def _rewrite(self, tr, cores):
        m = cores[0]                    # `specialise` checked that the cores agree in heads, head_dim, dtype
        qs, ks = m.seq_dims["q"], m.seq_dims["k"]
        cfg = dataclasses.replace(self.lifted.config, heads=heads(val(m.q), qs), kv_heads=heads(val(m.k), ks),
                                  head_dim=int(val(m.q).shape[-1]))
        return rewrite(tr, cores, MobaCore(self, cfg, m.seq_dims, val(m.out).dtype))

    def core(self, q, k, v, config) -> torch.Tensor:
        """The MoBA core on ``q``, ``k``, ``v`` in ``[B, heads, N, D]`` (strided views are fine)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            c = self.compiled_for(MobaRecipe(config, outputs=("out", "lse", "indices")), q.dtype, q.device)

            def forward(ts):           # out, and what the backward reads: out, lse and the selected blocks
                out, lse, idx = self.run(c, dict(zip("qkv", ts)))
                return (out,), {"out": out, "lse": lse, "indices": idx}

            def backward(ts, saved, grads, needs):   # generated kernels over the blocks the forward selected
                self._count("backward: kernels")
                bw = self.compiled_for(BackwardRecipe(MobaRecipe(config)), q.dtype, q.device)
                d_out = grads[0] if grads[0] is not None else torch.zeros_like(saved["out"])
                return self.run(bw, {**dict(zip("qkv", ts)), **saved, "d_out": d_out,
                                     "d_lse": torch.zeros_like(saved["lse"])})

            return self.serve("kernels forward and backward", KernelsBoth.apply, forward, backward, None, q, k, v)[0]
        c = self.compiled_for(MobaRecipe(config, outputs=("out", "indices")), q.dtype, q.device)
        return self.serve("kernels", self.run, c, {"q": q, "k": k, "v": v})[0]

    def dump_suffix(self, c: Compiled) -> str:
        cfg = c.recipe.config
        return "" if cfg == self.lifted.config else f".h{cfg.heads}kv{cfg.kv_heads}d{cfg.head_dim}"

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
            return [f"PENDING {where}: MoBA candidate (its forward uses topk); analysed at its first call"] + \
                [f"        {x}" for x in self.call_lines()]
        if self.state == "eager":
            return [f"EAGER   {where}: MoBA core not lifted: {self.reason}"] + [f"        {x}" for x in self.call_lines()]
        if self.state != "lifted":
            return []
        lf = self.lifted
        lines = [f"LIFTED  {where}: {lf.formulation}", f"        {lf.config.describe()}"]
        lines += [f"        {n}" for n in lf.notes]
        gms = [g for g in self.graphs.values() if not isinstance(g, str)]
        if gms:
            kept = eager_modules(gms[-1])
            lines.append(f"        the rest of forward stays PyTorch ({len(self.graphs)} specialised call "
                         f"signature(s))" + (f"; eager submodules: {', '.join(kept)}" if kept else ""))
        program = self.program_lines()
        if lf.host:                       # the kernels could be captured, the forward around them cannot
            program = [f"CUDA graphs: not capturable: forward reads {lf.host[0]} on the host (.item())"
                       if x.startswith("CUDA graphs:") else x for x in program]
        lines += [f"        {x}" for x in program]
        lines.append("        backward: generated kernels over the blocks the forward selected (d q by query "
                     "tiles, d k / d v key-block-major); the gate's selection has no gradient")
        return lines + [f"        {x}" for x in self.call_lines()]

    def program_note(self, c: Compiled) -> str:
        cfg = c.recipe.config
        heads = "" if cfg == self.lifted.config else f" (heads {cfg.heads}/{cfg.kv_heads}, head_dim {cfg.head_dim})"
        return heads + " (keys pooled by a torch op; the densify kernel runs once sequences are long)"
