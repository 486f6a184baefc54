"""infer-shapes: recompute every result type from its operands.

Expects: a structurally valid graph (operands defined before use, known ops and attributes).
Guarantees: each result's dtype and shape (sympy dims in T) equal its op's inference rule, so
later passes and the lowering can size buffers and grids from the types alone.
"""
from __future__ import annotations

from moec.ir.graph import Graph


def infer_shapes(g: Graph, ctx) -> Graph:
    types = dict(g.inputs)
    nodes = []
    for n in g.nodes:
        inferred = n.opdef.infer({r: types[v] for r, v in n.operands}, n.attr)
        n = n.replace(types=tuple(inferred[r] for r, _ in n.results))
        types.update(n.result_types)
        nodes.append(n)
    return g.with_nodes(nodes)
