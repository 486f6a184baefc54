"""choose-moba-scheme: decide how each MoBA attention is computed, in the IR.

Expects: ``block_sparse_attention`` nodes with ``scheme`` ``auto``, ``rows`` or ``densify``.
Guarantees: every attention node names one scheme, ``rows`` or ``densify``:

- ``rows``: query tiles with row masks, the union of the tile's blocks (`moba_attention_kernel`);
- ``densify``: FlashMoBA's collect and densify with window ownership (`moba_window_kernel`): per window of
  consecutive rows, the rows that selected each past block gathered into dense tiles, the window's
  softmax state carried across its blocks, no partials;
- ``auto``: both, and a ``select`` per result taking densify's when an average sequence has more than
  ``DENSIFY_BLOCKS_PER_K * top_k`` blocks (``ceiling(ceiling(T / max(S, 1)) / bs)``; ``S`` the packed
  sequences, 1 without), rows' otherwise; ``top_k = 1`` is always rows (the own block alone: no union
  to waste work on). The condition reads shapes only, so a call decides on the host without
  synchronising and runs one branch.

Why a threshold: the rows program does |union of the blocks its BLOCK_M rows selected| x bs x BLOCK_M
of score work for top_k x bs x BLOCK_M useful, and the union only exceeds top_k when a sequence has
more blocks than that, growing toward all of them as N grows; densify does the useful work plus the
partly filled last chunk of each (window, block) and reads and writes the gathered rows' softmax state
(in L2) per block. The factor is a guess: it has not been measured on a GPU.
Results all schemes give are the same (`moec.moba.reference.moba_attention_from_indices`).
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node

from .rewrite import fresh_name, swap

DENSIFY_BLOCKS_PER_K = 4


def densify_condition(block_size: int, top_k: int, varlen: bool) -> str:
    """The shape condition (a ``select``'s ``when``) under which ``auto`` takes densify."""
    rows = "ceiling(T/Max(S, 1))" if varlen else "T"
    return f"ceiling({rows}/{block_size}) > {DENSIFY_BLOCKS_PER_K * top_k}"


def choose_moba_scheme(g: Graph, ctx) -> Graph:
    repl: dict[int, list[Node]] = {}
    for i, n in enumerate(g.nodes):
        if n.op != "block_sparse_attention" or n.attr["scheme"] in ("rows", "densify"):
            continue
        top_k = int(g.types[n.ins["indices"]].shape[3])
        rows = n.replace(attrs={"scheme": "rows"})
        if top_k <= 1:
            repl[i] = [rows]
            continue
        by_rows = tuple((r, fresh_name(g, f"{v}_rows")) for r, v in n.results)
        by_densify = tuple((r, fresh_name(g, f"{v}_densify")) for r, v in n.results)
        when = (("when", densify_condition(n.attr["block_size"], top_k, "cu_seqlens" in n.ins)),)
        selects = [Node("select", (("a", d), ("b", r)), (("out", v),), (t,), when)
                   for (_, v), (_, d), (_, r), t in zip(n.results, by_densify, by_rows, n.types)]
        repl[i] = [rows.replace(results=by_rows), n.replace(attrs={"scheme": "densify"}, results=by_densify),
                   *selects]
    return swap(g, repl) if repl else g
