"""fuse-routing: gate GEMM + score + top-k + renormalise + counts become one `fused_route`.

Expects: canonical routers (``score_then_topk``); ``route(logits=linear(x, w, b))`` or ``route(logits=%in)``
on a graph input (an external router's logits: the kernel reads them, no GEMM, no noise, no gate), the noise
projection (if noisy) another ``linear`` of the same ``x`` read only by the route; optionally a
``shared_gate(x, w)`` (the first one of that ``x``). Nothing reads the logits or the gate's scale
before the route (the kernel that makes them runs where the route was).
Guarantees: each such route is one ``fused_route`` reading ``x`` and the router weights (and a token
table's given choices),
which also yields per-expert pair counts when the aux loss reads them; the shared-expert gate of the same ``x`` is computed
in the same kernel (``shared_scale``); the aux loss becomes ``aux_loss(counts, prob_sum)``;
capacity becomes an ``apply_capacity`` node after the kernel (it needs a global, ordered
count over all tokens, which one tile of tokens cannot see; a noisy router with capacity stays
unfused, as capacity ranks by the noisy scores). Logits (before noise) are written out only when
something still reads them. The linear nodes that only fed the route disappear.
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.ops import OPS, router_attrs, router_config

from .rewrite import fresh_name, swap


def _fuse_one(g: Graph, i: int, route: Node) -> Graph:
    lin = g.producer(route.ins["logits"])
    given = lin is None                 # the logits are a graph input: the kernel reads them
    if (not given and lin.op != "linear") or (given and "noise_logits" in route.ins):
        return g
    x = None if given else lin.ins["x"]
    cfg = router_config(route.attr)
    noise = g.producer(route.ins["noise_logits"]) if "noise_logits" in route.ins else None
    if "noise_logits" in route.ins and (noise is None or noise.op != "linear" or noise.ins["x"] != x
                                        or g.uses(route.ins["noise_logits"]) != 1):
        return g
    capacity = cfg.has_capacity
    if capacity and cfg.noisy:      # capacity ranks by the noisy scores, which the kernel keeps inside
        return g
    gates = [n for n in g.find("shared_gate") if n.ins["x"] == x][:1] if not given else []
    logits = route.ins["logits"]
    early = [u for v in ([] if given else [logits]) + [s.outs["scale"] for s in gates] for u in g.users(v)
             if g.nodes.index(u) < i]
    if early:                       # they would read a value the fused kernel defines only at the route
        return g
    logits_needed = not given and (capacity or g.uses(logits) > 1)

    if given:
        operands = {"logits": logits, "score_bias": route.ins.get("score_bias")}
    else:
        operands = {"x": x, "w": lin.ins["w"], "b": lin.ins.get("b"), "score_bias": route.ins.get("score_bias"),
                    "w_noise": noise.ins["w"] if noise else None,
                    "w_shared_gate": gates[0].ins["w"] if gates else None}
    operands["choices"] = route.ins.get("choices")      # a token table's: the kernel weights them
    outs = route.outs
    names = {"ids": fresh_name(g, "ids_routed") if capacity else outs["ids"],
             "weights": fresh_name(g, "weights_routed") if capacity else outs["weights"]}
    if cfg.aux_loss:
        names["counts"] = fresh_name(g, "counts")
        names["prob_sum"] = fresh_name(g, "prob_sum")
    if gates:
        names["shared_scale"] = gates[0].outs["scale"]
    if logits_needed:
        names["logits"] = logits
    fused_cfg = cfg.without_capacity()
    inferred = OPS["fused_route"].infer({r: g.types[v] for r, v in operands.items() if v}, router_attrs(fused_cfg))
    roles = [r for r in OPS["fused_route"].results if r in names]
    fused = Node("fused_route", tuple((r, v) for r, v in operands.items() if v),
                 tuple((r, names[r]) for r in roles), tuple(inferred[r] for r in roles),
                 tuple(router_attrs(fused_cfg).items()))
    new = [fused]
    if cfg.aux_loss:
        new.append(Node("aux_loss", (("counts", names["counts"]), ("prob_sum", names["prob_sum"]),
                                     ("ids", names["ids"])),
                        (("out", outs["aux"]),), (g.types[outs["aux"]],), (("num_experts", cfg.num_experts),
                                                                           ("first_choice", cfg.aux_counts == "first"))))
    if capacity:
        new.append(Node("apply_capacity", (("ids", names["ids"]), ("weights", names["weights"]),
                                           ("logits", logits), *(("score_bias", v) for v in [route.ins.get("score_bias")] if v)),
                        (("ids", outs["ids"]), ("weights", outs["weights"])),
                        (g.types[outs["ids"]], g.types[outs["weights"]]), tuple(router_attrs(cfg).items())))
    drop = {g.nodes.index(n): [] for n in gates + ([] if given else [lin]) + ([noise] if noise else [])}
    # the fused node must come after every input it reads: place it where the route was
    return swap(g, {**drop, i: new})


def fuse_routing(g: Graph, ctx) -> Graph:
    for route in g.find("route"):
        g = _fuse_one(g, g.nodes.index(route), route)
    return g
