"""fold-permute: the token permute becomes the first grouped GEMM's gathered A-load.

Expects: ``grouped_gemm(a=permute(x, order))`` that does not gather already and reads no other
``order`` (e.g. for its scale); a permute with a scale (experts whose input the routing weight scales) only
into a GEMM without a scale of its own.
Guarantees: those GEMMs read ``a=x`` with ``order`` and ``gather_top_k=k``: row i loads
``x[order[i] // k]`` inside the kernel, so no permuted copy of the activations is written; a permute's
scale becomes the GEMM's ``scale`` with ``scale_in`` (``(s x) @ W = s (x @ W)``, applied to the fp32
accumulator before biases and activation). The permute disappears once nothing reads it.
"""
from __future__ import annotations

from moec.ir.graph import Graph

from .rewrite import swap


def fold_permute(g: Graph, ctx) -> Graph:
    repl = {}
    for i, n in enumerate(g.nodes):
        if n.op != "grouped_gemm" or n.attr["gather_top_k"]:
            continue
        p = g.producer(n.ins["a"])
        if p is None or p.op != "permute" or n.ins.get("order", p.ins["order"]) != p.ins["order"]:
            continue
        if "scale" in p.ins and ("scale" in n.ins or "pre" in n.outs):
            continue
        scaled = {"scale": p.ins["scale"]} if "scale" in p.ins else {}
        repl[i] = [n.replace(operands={"a": p.ins["x"], "order": p.ins["order"], **scaled},
                             attrs={"gather_top_k": p.attr["top_k"], **({"scale_in": True} if scaled else {})})]
    return swap(g, repl)
