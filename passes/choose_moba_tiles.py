"""choose-moba-tiles: attach a tile to every MoBA kernel node.

Expects: ``fused_block_gate`` and ``block_sparse_attention`` nodes (after ``fuse-block-gate``) and
``ctx.arch``.
Guarantees: each has ``tiles={None: tile}`` (one tile for every sequence length T): the gate a
`MobaGateTile` (BLOCK_M resident query rows, BLOCK_NB pooled keys streamed per step), the attention a
`MobaAttentionTile` (BLOCK_M query rows, keys in chunks of BLOCK_N). Both come from the per-arch
tables of `moec.runtime.moba_common` (`gate_tile`, `attention_tile`), which size BLOCK_N to the block
size and reduce stages until the pipelined shared memory fits the arch; on ``cpu`` (the Triton
interpreter) few, wide programs. An unfused ``block_gate`` gets no tile: it runs as torch code.
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.runtime.moba_common import attention_tile, gate_tile


def choose_moba_tiles(g: Graph, ctx) -> Graph:
    types = g.types
    nodes = []
    for n in g.nodes:
        if n.op in ("fused_block_gate", "block_sparse_attention"):
            bs, D = n.attr["block_size"], int(types[n.ins["q"]].shape[3])
            pick = gate_tile if n.op == "fused_block_gate" else attention_tile
            n = n.replace(attrs={"tiles": {None: pick(bs, D, ctx.arch)}})
        nodes.append(n)
    return g.with_nodes(nodes)
