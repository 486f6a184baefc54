"""choose-moba-scheme: decide how each MoBA attention is computed, in the IR.

Expects: ``block_sparse_attention`` nodes with ``scheme`` ``auto``, ``rows`` or ``densify``.
Guarantees: every attention names the kernels that compute it, as IR nodes:

- ``rows``: ``block_sparse_attention {scheme='rows'}`` (query tiles with row masks);
- ``densify``: ``densify_attention`` (collect the (query, slot) entries per key block, dense gathered
  tiles, one (out, lse) partial per entry) then ``own_block_merge`` (own block, merge by log-sum-exp);
- ``auto``: both, and a ``select`` per result taking densify's when an average sequence has more than
  ``DENSIFY_BLOCKS_PER_K * top_k`` blocks (``ceiling(ceiling(T / max(S, 1)) / bs)``; ``S`` the packed
  sequences, 1 without), rows' otherwise; ``top_k = 1`` is always rows (the own block alone: no union
  to waste work on). The condition reads shapes only, so a call decides on the host without
  synchronising and runs one branch.

Why a threshold: the rows program does |union of the blocks its BLOCK_M rows selected| x bs x BLOCK_M
of score work for top_k x bs x BLOCK_M useful, and the union only exceeds top_k when a sequence has
more blocks than that, growing toward all of them as N grows; densify does the useful work (plus
partly filled last chunks) but pays the collect (a sort of B*H*N*K keys) and the partials' traffic
(write + read of K partial rows per query). The factor is a guess: it has not been measured on a GPU.
Results all schemes give are the same (`moec.moba.reference.moba_attention_from_indices`).
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.ops import OPS

from .rewrite import fresh_name, swap

DENSIFY_BLOCKS_PER_K = 4


def densify_condition(block_size: int, top_k: int, varlen: bool) -> str:
    """The shape condition (a ``select``'s ``when``) under which ``auto`` takes densify."""
    rows = "ceiling(T/Max(S, 1))" if varlen else "T"
    return f"ceiling({rows}/{block_size}) > {DENSIFY_BLOCKS_PER_K * top_k}"


def _densify_nodes(g: Graph, n: Node, results: tuple, types: tuple) -> list[Node]:
    """``densify_attention`` + ``own_block_merge`` computing ``n``'s results under the given names."""
    common = tuple((r, v) for r, v in n.operands)
    bs = (("block_size", n.attr["block_size"]),)
    part = (("part_o", fresh_name(g, f"{n.name}_part_o")), ("part_lse", fresh_name(g, f"{n.name}_part_lse")))
    q, idx = g.types[n.ins["q"]], g.types[n.ins["indices"]]
    part_types = OPS["densify_attention"].infer({"q": q, "indices": idx}, dict(bs))
    densify = Node("densify_attention", common, part, (part_types["part_o"], part_types["part_lse"]), bs)
    merge = Node("own_block_merge", common + part, results, types, bs)
    return [densify, merge]


def choose_moba_scheme(g: Graph, ctx) -> Graph:
    repl: dict[int, list[Node]] = {}
    for i, n in enumerate(g.nodes):
        if n.op != "block_sparse_attention":
            continue
        top_k = int(g.types[n.ins["indices"]].shape[3])
        scheme = "rows" if n.attr["scheme"] == "auto" and top_k <= 1 else n.attr["scheme"]
        rows = n.replace(attrs={"scheme": "rows"})
        if scheme == "rows":
            repl[i] = [rows]
        elif scheme == "densify":
            repl[i] = _densify_nodes(g, n, n.results, n.types)
        else:
            by_rows = tuple((r, fresh_name(g, f"{v}_rows")) for r, v in n.results)
            by_densify = tuple((r, fresh_name(g, f"{v}_densify")) for r, v in n.results)
            when = (("when", densify_condition(n.attr["block_size"], top_k, "cu_seqlens" in n.ins)),)
            selects = [Node("select", (("a", d), ("b", r)), (("out", v),), (t,), when)
                       for (_, v), (_, d), (_, r), t in zip(n.results, by_densify, by_rows, n.types)]
            repl[i] = [rows.replace(results=by_rows), *_densify_nodes(g, n, by_densify, n.types), *selects]
    return swap(g, repl) if repl else g
