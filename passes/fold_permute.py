"""fold-permute: the token permute becomes the first grouped GEMM's gathered A-load.

Expects: ``grouped_gemm(a=permute(x, order))`` that does not gather already and reads no other
``order`` (e.g. for its scale).
Guarantees: those GEMMs read ``a=x`` with ``order`` and ``gather_top_k=k``: row i loads
``x[order[i] // k]`` inside the kernel, so no permuted copy of the activations is written.
The permute disappears once nothing reads it.
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
        repl[i] = [n.replace(operands={"a": p.ins["x"], "order": p.ins["order"]},
                             attrs={"gather_top_k": p.attr["top_k"]})]
    return swap(g, repl)
