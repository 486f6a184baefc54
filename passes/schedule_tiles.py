"""schedule-tiles: the dispatch writes each routed grouped GEMM's tile schedule; the GEMM reads it.

Expects: choose-tiles ran (each ``grouped_gemm`` has its ``tiles``).
Guarantees: for the routed ``grouped_gemm`` nodes (an ``offsets`` operand) reading a ``dispatch`` /
``fused_route``'s offsets, that producer also yields ``schedule`` with ``schedule_block_m`` = the first
such GEMM's BLOCK_M per token-count bucket (``{bound: BLOCK_M}``, folded like tiles), and every such GEMM
whose tiles have that BLOCK_M in every bucket takes the ``schedule`` operand: its programs read their
tile's expert and rows (three loads) instead of scanning all ``E + 1`` offsets, and a persistent tile loops
up to the schedule's tile count. A GEMM with other row tiles keeps its scan (one schedule per dispatch: a
layer's GEMMs share their rows, and mostly their BLOCK_M). Results are unchanged: where a tile's rows are
is not what it computes.
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.tiles import merge_buckets

from .rewrite import fresh_name, swap


def block_m_of(tiles: dict) -> dict:
    """``{bound: BLOCK_M}`` of a node's tiles, folded (adjacent buckets with one BLOCK_M merged)."""
    return merge_buckets({b: tile.block_m for b, tile in tiles.items()})


def schedule_tiles(g: Graph, ctx) -> Graph:
    for gemm in g.find("grouped_gemm"):
        offsets = gemm.ins.get("offsets")
        producer = g.producer(offsets) if offsets else None
        if "schedule" in gemm.ins or producer is None or producer.op not in ("dispatch", "fused_route"):
            continue
        wanted = block_m_of(gemm.attr["tiles"])
        if "schedule" not in producer.outs:
            name = fresh_name(g, f"{offsets}_schedule")
            roles = [r for r in producer.opdef.results if r in producer.outs or r == "schedule"]
            results = {**producer.outs, "schedule": name}
            types = {**producer.result_types, name: producer.opdef.infer(
                {r: g.types[v] for r, v in producer.operands}, producer.attr)["schedule"]}
            producer_new = producer.replace(results=tuple((r, results[r]) for r in roles),
                                            types=tuple(types[results[r]] for r in roles),
                                            attrs={"schedule_block_m": wanted})
            g = swap(g, {g.nodes.index(producer): [producer_new]})
            producer, gemm = producer_new, next(n for n in g.nodes if n.name == gemm.name)
        if producer.attr["schedule_block_m"] != wanted:
            continue
        g = swap(g, {g.nodes.index(gemm): [gemm.replace(operands={"schedule": producer.outs["schedule"]})]})
    return g
