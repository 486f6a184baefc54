"""fold-combine: routing weights and the un-permute go into the down projection's epilogue.

Expects: ``combine(y=G, order, [weights,] ids)`` with G a plain grouped GEMM read only by it (no
scale, no scatter, no other ``order``); optionally followed by ``add`` (the shared expert) and
``cast`` (back to the input dtype), each the only reader of what it reads.
Also ``combine(y=expert_norm(...), weights)``: the norm's kernel takes the weights and the un-permute instead
(scatter), the reduce the same.
Guarantees: G stores row i, multiplied by its pair's routing weight (when the combine weighs), at row
``order[i]`` of a pair-major buffer (``scatter``, ``scale``): bf16 for a bf16 layer (the product taken on G's fp32
accumulators and rounded once; half the bytes of fp32), fp32 otherwise (fp16's range is too small for
rows whose sum is not); a ``reduce_topk`` sums each token's k rows in fp32 in slot order
(deterministic: no atomics), adds the shared expert's output as ``residual`` and casts on store,
absorbing the ``add`` and ``cast``.
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.ops import OPS

from .rewrite import fresh_name, single_use_producer, swap


def _reduce(g: Graph, combine: Node, ys: str):
    """The reduce_topk replacing ``combine``, absorbing a following add and cast."""
    out = combine.outs["out"]
    residual, dtype, absorbed = None, "f32", []
    add = next(iter(g.users(out)), None) if g.uses(out) == 1 else None
    if add is not None and add.op == "add":
        residual = add.ins["b"] if add.ins["a"] == out else add.ins["a"]
        absorbed.append(add)
        out = add.outs["out"]
    cast = next(iter(g.users(out)), None) if g.uses(out) == 1 else None
    if cast is not None and cast.op == "cast":
        dtype = cast.attr["dtype"]
        absorbed.append(cast)
        out = cast.outs["out"]
    operands = {"y": ys, "ids": combine.ins["ids"], "residual": residual}
    operands = {r: v for r, v in operands.items() if v}
    attrs = {"top_k": combine.attr["top_k"], "out_dtype": dtype}
    t = OPS["reduce_topk"].infer({"y": g.types[combine.ins["y"]], "ids": g.types[combine.ins["ids"]]}, attrs)
    return Node("reduce_topk", tuple(operands.items()), (("out", out),), (t["out"],), tuple(attrs.items())), absorbed


def _pair_dtype(dtype: str) -> str:
    """The pair rows' dtype: bf16 rows for a bf16 layer (fp32's range: a row that fits fp32 fits bf16), fp32 for
    the rest (an fp16 row can overflow where the weighted sum of a token's rows does not: routed scaling and
    rows of opposite sign)."""
    return "bf16" if dtype == "bf16" else "f32"


def _into_expert_norm(g: Graph, i: int, n: Node, repl: dict) -> None:
    """The combine of expert norms' rows: the weights and un-permute go into the norm's kernel instead (it
    normalises whole rows, so the GEMM before it keeps its plain store)."""
    norm = single_use_producer(g, n.ins["y"], "expert_norm")
    if norm is None or norm.attr["scatter"]:
        return
    ys = fresh_name(g, "pairs_out")
    scattered = norm.replace(operands={"order": n.ins["order"], "weights": n.ins.get("weights")},
                             attrs={"scatter": True}, results=(("out", ys),))
    scattered = scattered.replace(types=(OPS["expert_norm"].infer({r: g.types[v] for r, v in scattered.operands},
                                                                  scattered.attr)["out"],))
    _fold(g, i, n, norm, scattered, ys, repl)


def _fold(g: Graph, i: int, combine: Node, producer: Node, scattered: Node, ys: str, repl: dict) -> None:
    """Replace ``producer`` and the combine at ``i`` with ``scattered`` (writing pair-major rows ``ys``) and the
    reduce of those rows, which absorbs what follows the combine."""
    reduce, absorbed = _reduce(g, combine, ys)
    repl[g.nodes.index(producer)] = []
    repl[i] = []
    last = max([i] + [g.nodes.index(a) for a in absorbed])
    for a in absorbed:
        repl[g.nodes.index(a)] = []
    repl[last] = [scattered, reduce]


def fold_combine(g: Graph, ctx) -> Graph:
    repl = {}
    for i, n in enumerate(g.nodes):
        if n.op != "combine":
            continue
        producer = g.producer(n.ins["y"])
        if "weights" in n.ins and producer is not None and producer.op == "expert_norm":
            _into_expert_norm(g, i, n, repl)
            continue
        gemm = single_use_producer(g, n.ins["y"], "grouped_gemm")
        if gemm is None or gemm.attr["scatter"] or "scale" in gemm.ins \
                or gemm.ins.get("order", n.ins["order"]) != n.ins["order"]:
            continue
        ys = fresh_name(g, "pairs_out")
        scattered = gemm.replace(operands={"order": n.ins["order"], "scale": n.ins.get("weights")},
                                 attrs={"scatter": True, "out_dtype": _pair_dtype(g.types[gemm.ins["a"]].dtype)},
                                 results=(("out", ys),))
        scattered = scattered.replace(types=(OPS["grouped_gemm"].infer(
            {r: g.types[v] for r, v in scattered.operands}, scattered.attr)["out"],))
        _fold(g, i, n, gemm, scattered, ys, repl)
    return swap(g, repl)
