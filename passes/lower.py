"""lower: the final graph becomes a `Program` of kernel launches (the one non-IR -> IR stage).

Expects: a verified graph after `choose-tiles` (kernel nodes carry tiles).
Guarantees: every ``fused_route``, ``grouped_gemm`` and ``reduce_topk`` node is a generated
Triton kernel per token-count bucket of its ``tiles`` (rendered here, so dumps can show them
before the first call; a call launches the one whose bucket holds its T); ``dispatch`` and
``aux_loss`` are device-side torch steps (sort / a few element-wise ops, no host sync);
``apply_capacity`` is a torch step too (its greedy, token-ordered overflow needs a global order;
`moec.runtime.capacity` computes it with fixed-shape ops, so it does not synchronise either).
Any node no pass fused (e.g. a lone ``linear``) runs through the reference interpreter's torch
code, so a graph is always runnable; `Program.torch_steps` lists those for explain().
"""
from __future__ import annotations

import torch

from moec.ir.graph import Graph, Node
from moec.ir.interp import run_node
from moec.ir.ops import glu_variant, router_config
from moec.ir.text import print_node
from moec.ir.types import DTYPES
from moec.runtime.program import Program, Step, Variant
from moec.ir.tiles import bucket_ranges

KERNEL_OPS = ("fused_route", "grouped_gemm", "reduce_topk")


def _kernel_step(n: Node, params_for, render, launch, fills_results: bool = True) -> Step:
    """A kernel step with one variant per bucket of the node's ``tiles`` (each rendered here)."""
    tiles = n.attr.get("tiles")
    if not tiles:
        raise ValueError(f"{n.op} %{n.name} has no tiles: run choose-tiles before lowering")
    bounds = list(tiles)
    variants = []
    for bound, (lo, hi) in zip(bounds, bucket_ranges(bounds)):
        params = params_for(tiles[bound], () if len(bounds) == 1 else (lo, hi))
        variants.append(Variant(bound, params, render(params)))
    return Step(n, variants=tuple(variants), launch=launch, fills_results=fills_results)


def _route_step(n: Node, g: Graph) -> Step:
    from moec.runtime.route_kernel import RouteParams, fused_route, render_route
    cfg = router_config(n.attr)

    def params_for(tile, bucket):
        return RouteParams(router=cfg, hidden=int(g.types[n.ins["x"]].shape[1]),
                           shared_gate="w_shared_gate" in n.ins, write_logits="logits" in n.outs,
                           tile=tile, header=print_node(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        noise = ctx["noise"] if (cfg.noisy and ctx["training"]) else None
        if cfg.noisy and ctx["training"] and noise is None:
            raise ValueError("noisy router in training mode: no noise tensor was drawn")
        r = fused_route(v["x"], v["w"], params, b_router=v.get("b"), score_bias=v.get("score_bias"),
                        w_noise=v.get("w_noise"), noise=noise, w_shared_gate=v.get("w_shared_gate"))
        got = {"ids": r.ids, "weights": r.weights, "counts": r.counts, "prob_sum": r.prob_sum,
               "shared_scale": r.shared_scale, "logits": r.logits}
        return {role: got[role] for role in outs}
    return _kernel_step(n, params_for, render_route, launch, fills_results=False)   # it allocates its outputs


def _gemm_step(n: Node, g: Graph) -> Step:
    from moec.runtime.grouped_gemm_kernel import GroupedGemmParams, grouped_gemm, render_grouped_gemm
    a = n.attr

    def params_for(tile, bucket):
        return GroupedGemmParams(num_experts=a["num_experts"], n=int(n.types[0].shape[1]),
                                 k_dim=int(g.types[n.ins["a"]].shape[1]), activation=a["activation"],
                                 glu=a["glu"], bias="bias" in n.ins, bias_up="bias_up" in n.ins,
                                 **glu_variant(a), gather_top_k=a["gather_top_k"], scatter=a["scatter"],
                                 scale="scale" in n.ins, out_dtype=n.types[0].torch_dtype,
                                 tile=tile, header=print_node(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        scale = v.get("scale")
        grouped_gemm(v["a"], v["w"], params, out=outs["out"], offsets=v.get("offsets"), order=v.get("order"),
                     w_up=v.get("w_up"), scale_vec=scale.reshape(-1) if scale is not None else None,
                     bias=v.get("bias"), bias_up=v.get("bias_up"))
    return _kernel_step(n, params_for, render_grouped_gemm, launch)


def _reduce_step(n: Node, g: Graph) -> Step:
    from moec.runtime.reduce_kernel import ReduceParams, reduce_topk, render_reduce

    def params_for(tile, bucket):
        return ReduceParams(top_k=n.attr["top_k"], hidden=int(n.types[0].shape[1]), residual="residual" in n.ins,
                            out_dtype=DTYPES[n.attr["out_dtype"]], tile=tile, header=print_node(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        reduce_topk(v["y"], params, out=outs["out"], ids=v["ids"], residual=v.get("residual"))
    return _kernel_step(n, params_for, render_reduce, launch)


def _dispatch_step(n: Node, g: Graph) -> Step:
    from moec.runtime.dispatch import dispatch

    def run(v, outs, ctx):
        order, offsets = dispatch(v["ids"], n.attr["num_experts"])
        return {"order": order, "offsets": offsets}
    return Step(n, run)


def _aux_step(n: Node, g: Graph) -> Step:
    E = n.attr["num_experts"]

    def run(v, outs, ctx):
        T = max(ctx["T"], 1)   # T = 0: counts are all zero, so the loss is 0
        return {"out": E * torch.sum(v["counts"].float() / T * v["prob_sum"] / T)}
    return Step(n, run)


def _capacity_step(n: Node, g: Graph) -> Step:
    from moec.runtime.capacity import apply_capacity
    cfg = router_config(n.attr)

    def run(v, outs, ctx):
        ids, weights = apply_capacity(v["ids"], v["weights"], v["logits"], cfg, v.get("score_bias"))
        return {"ids": ids, "weights": weights}
    return Step(n, run)


def _torch_step(n: Node, g: Graph) -> Step:
    def run(v, outs, ctx):
        by_name = {name: v[role] for role, name in n.operands}
        got = run_node(n, by_name, ctx)
        return {role: got[name] for role, name in n.results}
    return Step(n, run)


LOWERINGS = {"fused_route": _route_step, "grouped_gemm": _gemm_step, "reduce_topk": _reduce_step,
             "dispatch": _dispatch_step, "aux_loss": _aux_step, "apply_capacity": _capacity_step}


def lower(g: Graph, arch: str) -> Program:
    steps = [LOWERINGS.get(n.op, _torch_step)(n, g) for n in g.nodes]
    return Program(g, steps, arch)


def torch_steps(p: Program) -> list[str]:
    """Ops of ``p`` that run as torch code rather than generated kernels."""
    return [s.node.op for s in p.steps if s.kernel is None and s.node.op not in ("dispatch", "aux_loss")]
