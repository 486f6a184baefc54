"""fuse-block-gate: ``block_pool`` + ``block_gate`` become one ``fused_block_gate`` (MoBA).

Expects: a verified MoBA graph (`moec.ir.build.build_moba_graph`): ``block_gate(q, pooled)`` whose
``pooled`` is ``block_pool(k)`` with the same ``block_size`` and the same packed sequences (``cu_seqlens``).
Guarantees: each such gate reads ``q`` and the raw keys ``k`` directly (with the pool's key convolution
and packed sequences): one kernel step that pools the
keys (``O(T D)``) and keeps, per query tile, a running top-k in registers while pooled-key tiles
stream past, so the ``[B, H, T, blocks]`` score matrix the unfused gate implies never exists in
memory (FlashMoBA's fused gate). Selection, ties and the index contract are unchanged
(`moec.moba.reference.moba_block_selection`). A ``block_pool`` nothing else reads disappears; a gate
fed by anything other than a ``block_pool`` is left alone (it runs as torch code).
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node

from .rewrite import swap


def fuse_block_gate(g: Graph, ctx) -> Graph:
    repl: dict[int, list[Node]] = {}
    for i, n in enumerate(g.nodes):
        if n.op != "block_gate":
            continue
        pool = g.producer(n.ins["pooled"])
        if pool is None or pool.op != "block_pool" or pool.attr["block_size"] != n.attr["block_size"] \
                or pool.ins.get("cu_seqlens") != n.ins.get("cu_seqlens"):
            continue
        attrs = (("block_size", n.attr["block_size"]), ("top_k", n.attr["top_k"]))
        operands = {"q": n.ins["q"], "k": pool.ins["k"], "cu_seqlens": n.ins.get("cu_seqlens"),
                    "kconv_weight": pool.ins.get("kconv_weight")}
        repl[i] = [Node("fused_block_gate", tuple((r, v) for r, v in operands.items() if v is not None),
                        n.results, n.types, attrs)]
    return swap(g, repl) if repl else g
