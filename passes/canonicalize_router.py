"""canonicalize-router: rewrite equivalent router forms into one canonical form.

Expects: ``route`` nodes with any valid RouterConfig.
Guarantees: ``order`` is ``score_then_topk`` or ``logits_then_score`` (top-k-then-softmax equals
softmax, top-k, then renormalise: softmax over the kept logits is each kept probability over their
sum); group
selection that keeps every group is dropped (``n_group=1``); a renormalised top-1 softmax has
weight exactly ``routed_scaling``, kept as is. The numeric result is unchanged.
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.ops import router_attrs, router_config


def canonicalize_router(g: Graph, ctx) -> Graph:
    nodes = []
    for n in g.nodes:
        if n.op == "route":
            cfg = router_config(n.attr)
            if cfg.order == "topk_then_score":
                cfg = cfg.replace(order="score_then_topk", renormalize=True)
            if cfg.n_group > 1 and cfg.topk_group == cfg.n_group:
                cfg = cfg.replace(n_group=1, topk_group=1, group_score="max")
            n = n.replace(attrs=router_attrs(cfg))
        nodes.append(n)
    return g.with_nodes(nodes)
