"""lower-moba: the final MoBA graph becomes a `MobaProgram` of kernel launches.

Expects: a verified graph after ``choose-moba-tiles`` (kernel nodes carry ``tiles={None: tile}``).
Guarantees: ``fused_block_gate`` is a kernel step (keys pooled by `moec.runtime.moba_common.pool_keys`,
a deterministic ``O(T D)`` torch op, then the generated gate kernel `moba_gate`), and
``block_sparse_attention`` the generated attention kernel (`moba_attention_fwd`); both are rendered
here, so a dump shows them before the first call. Any other node (an unfused ``block_pool`` or
``block_gate``) runs through the reference interpreter's torch code, so every graph is runnable.
Shapes are bound at call time from ``q`` (``B``, ``T``); every buffer and grid depends on shapes only
(no host synchronisation).

The launchers are the public ones of ``runtime/moba_gate_kernel.py`` and
``runtime/moba_attention_kernel.py``. The attention's tile is the node's (the "rows" scheme, rendered
here); where `moba_common.choose_scheme` sends a call to another scheme (long sequences: the
key-block-major "densify" kernels), that scheme's own tiles apply and the launch record
(``launches.json`` in a dump) shows its kernels.
"""
from __future__ import annotations

import torch

from moec.ir.graph import Graph, Node
from moec.passes.lower import _torch_step
from moec.runtime.program import Program, Step, Variant


def _dtype_name(g: Graph, n: Node) -> str:
    return str(g.types[n.ins["q"]].torch_dtype).replace("torch.", "")


def _shape(g: Graph, n: Node):
    _, H, _, D = g.types[n.ins["q"]].shape
    _, Hkv, _, _ = g.types[n.ins["k"]].shape
    return int(H), int(Hkv), int(D)


def _gate_step(n: Node, g: Graph) -> Step:
    from moec.runtime.moba_common import pool_keys
    from moec.runtime.moba_gate_kernel import MobaGateParams, moba_gate, render_gate
    H, Hkv, D = _shape(g, n)
    bs, top_k = n.attr["block_size"], n.attr["top_k"]
    params = MobaGateParams(bs, top_k, D, H // Hkv, False, n.attr["tiles"][None], _dtype_name(g, n))

    def launch(p, v, outs, ctx):
        pooled = pool_keys(v["k"], bs)
        return {"indices": moba_gate(v["q"], pooled, block_size=bs, top_k=top_k, tile=p.tile)}
    return Step(n, variants=(Variant(None, params, render_gate(params)),), launch=launch)


def _attention_step(n: Node, g: Graph) -> Step:
    from moec.runtime import moba_common
    from moec.runtime.moba_attention_kernel import MobaAttentionParams, moba_attention_fwd, render_attention
    H, Hkv, D = _shape(g, n)
    bs = n.attr["block_size"]
    top_k = int(g.types[n.ins["indices"]].shape[3])
    params = MobaAttentionParams(bs, top_k, D, H // Hkv, False, n.attr["tiles"][None], _dtype_name(g, n))
    choose = getattr(moba_common, "choose_scheme", None)

    def launch(p, v, outs, ctx):
        kw = {"tile": p.tile}
        if choose is not None:       # the attention kernel picks its scheme from host-side shapes
            kw["scheme"] = choose("auto", n_rows=v["q"].shape[2], block_size=bs, top_k=top_k)
            if kw["scheme"] != "rows":
                kw["tile"] = None    # that scheme's own tile tables
        out, lse = moba_attention_fwd(v["q"], v["k"], v["v"], v["indices"], block_size=bs, **kw)
        return {"out": out, "lse": lse}
    return Step(n, variants=(Variant(None, params, render_attention(params)),), launch=launch)


LOWERINGS = {"fused_block_gate": _gate_step, "block_sparse_attention": _attention_step}


class MobaProgram(Program):
    """A lowered MoBA core: ``run({"q", "k", "v"})`` binds ``B`` and ``T`` from ``q`` (``[B, H, T, D]``,
    any strides) and runs the steps in order; each step returns its own results."""

    def __post_init__(self) -> None:
        self._allocs = None          # steps allocate their results (sizes need B as well as T)

    def run(self, inputs: dict[str, torch.Tensor], *, on_step=None, **_) -> list[torch.Tensor]:
        values = self.run_values(inputs, on_step=on_step)
        return [values[o] for o in self.graph.outputs]

    def run_values(self, inputs: dict[str, torch.Tensor], *, on_step=None) -> dict[str, torch.Tensor]:
        """Every value of the graph (the block indices too, which the backward reuses)."""
        q = inputs["q"]
        values = dict(inputs)
        ctx = {"T": q.shape[2], "B": q.shape[0], "training": False, "noise": None}
        for step in self.steps:
            ins = {r: values[v] for r, v in step.node.operands}
            outs = dict(step.execute(ins, {}, ctx) or {})
            if on_step is not None:
                on_step(step, ins, outs, ctx)
            values.update({v: outs[r] for r, v in step.node.results})
        return values


def lower_moba(g: Graph, arch: str) -> MobaProgram:
    return MobaProgram(g, [LOWERINGS.get(n.op, _torch_step)(n, g) for n in g.nodes], arch)


def torch_steps(p: Program) -> list[str]:
    """Ops of ``p`` that run as torch code rather than generated kernels."""
    return [s.node.op for s in p.steps if s.kernel is None]
