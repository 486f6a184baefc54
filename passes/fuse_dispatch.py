"""fuse-dispatch: the routing kernel also groups the (token, slot) pairs by expert.

Expects: fuse-routing ran. A ``dispatch`` whose ``ids`` are a ``fused_route``'s own (nothing, e.g.
capacity or identity experts, between them: both change the ids after the kernel).
Guarantees: that ``fused_route`` also yields the dispatch's ``order`` and ``offsets`` (the same value
names) and the ``dispatch`` node is gone. The lowering sorts inside the routing kernel, a counting
sort by expert from the program's own per-expert counts, when one program holds every token (``T <=
BLOCK_T``: the decode buckets), so a decode step runs no ATen sort, histogram or cumsum; for a larger
T the kernel's programs cannot see each other's tokens and the step sorts on the device after it
(`moec.runtime.dispatch`, still no host synchronisation). Either way the order is the stable one
``dispatch`` defines (token order within an expert).
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.ops import OPS

from .rewrite import swap


def fuse_dispatch(g: Graph, ctx) -> Graph:
    for d in g.find("dispatch"):
        route = g.producer(d.ins["ids"])
        if route is None or route.op != "fused_route" or "order" in route.outs:
            continue
        results = {**route.outs, "order": d.outs["order"], "offsets": d.outs["offsets"]}
        roles = [r for r in OPS["fused_route"].results if r in results]        # in the op's result order
        fused = route.replace(results=tuple((r, results[r]) for r in roles),
                              types=tuple(g.types[results[r]] for r in roles))
        g = swap(g, {g.nodes.index(route): [fused], g.nodes.index(d): []})
    return g
