"""fuse-activation: gate/up projections and their activation become one GEMM with an epilogue.

Expects: ``activate(gate=G, up=U)`` where G and U are plain grouped GEMMs over the same rows
(same ``a``, ``offsets``, ``order``, gather, and input scale when their rows are scaled: ``scale_in``) read
only by the activation (or, non-gated, ``activate(gate=U)``).
Guarantees: one ``grouped_gemm(w=G.w, w_up=U.w, bias=G.bias, bias_up=U.bias)`` with ``activation``,
``glu`` and the GLU variant (clamp, slope, up shift) set: both products are accumulated in the same K
loop over one A tile, their biases added and SwiGLU/GeGLU applied to the fp32 accumulators before the
single store; the intermediate projections never reach memory.
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.ops import glu_variant
from moec.spec import GLU_PLAIN

from .rewrite import single_use_producer, swap

_SAME = ("a", "offsets", "order", "scale")


def fuse_activation(g: Graph, ctx) -> Graph:
    repl = {}
    for i, n in enumerate(g.nodes):
        if n.op != "activate":
            continue
        gate = single_use_producer(g, n.ins["gate"], "grouped_gemm")
        up = single_use_producer(g, n.ins["up"], "grouped_gemm") if n.attr["glu"] else None
        # (no activation implies no w_up: the verifier admits w_up only with glu and an activation)
        plain = lambda m: m is not None and m.attr["activation"] is None \
            and ("scale" not in m.ins or m.attr["scale_in"]) and not m.attr["scatter"]
        if not plain(gate) or (n.attr["glu"] and not plain(up)):
            continue
        if up is not None and any(gate.ins.get(r) != up.ins.get(r) for r in _SAME) \
                or up is not None and gate.attr != up.attr:
            continue
        fused = gate.replace(operands={"w_up": up.ins["w"] if up else None,
                                       "bias_up": up.ins.get("bias") if up else None},
                             attrs={"activation": n.attr["activation"], "glu": n.attr["glu"],
                                    **{k: v for k, v in glu_variant(n.attr).items() if v != GLU_PLAIN[k]}},
                             results=((("out", n.outs["out"]),)), types=n.types)
        repl[g.nodes.index(gate)] = []
        if up is not None:
            repl[g.nodes.index(up)] = []
        repl[i] = [fused]
    return swap(g, repl)
