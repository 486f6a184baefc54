"""Lowering of the MoE kernel nodes (`moec.passes.lower` runs every node's).

``fused_route``, ``grouped_gemm`` and ``reduce_topk`` are generated Triton kernels per token-count
bucket of their ``tiles``; ``dispatch`` and ``aux_loss`` are device-side torch steps (sort / a few
element-wise ops, no host sync); ``apply_capacity`` is a torch step too (its greedy, token-ordered
overflow needs a global order; `moec.runtime.capacity` computes it with fixed-shape ops, so it does
not synchronise either).
"""
from __future__ import annotations

import torch

from moec.ir.graph import Graph, Node
from moec.ir.ops import glu_variant, router_config
from moec.ir.types import DTYPES
from moec.runtime.capacity import apply_capacity
from moec.runtime.dispatch import dispatch
from moec.runtime.grouped_gemm_kernel import GroupedGemmParams, grouped_gemm, render_grouped_gemm
from moec.runtime.program import Step
from moec.runtime.reduce_kernel import ReduceParams, reduce_topk, render_reduce
from moec.runtime.route_kernel import RouteParams, fused_route, render_route

from .lower_steps import header, kernel_step


def _route_step(n: Node, g: Graph) -> Step:
    cfg = router_config(n.attr)

    def params_for(tile, bucket):
        return RouteParams(router=cfg, hidden=int(g.types[n.ins["x"]].shape[1]),
                           shared_gate="w_shared_gate" in n.ins, write_logits="logits" in n.outs,
                           tile=tile, header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        noise = ctx["noise"] if (cfg.noisy and ctx["training"]) else None
        if cfg.noisy and ctx["training"] and noise is None:
            raise ValueError("noisy router in training mode: no noise tensor was drawn")
        r = fused_route(v["x"], v["w"], params, b_router=v.get("b"), score_bias=v.get("score_bias"),
                        w_noise=v.get("w_noise"), noise=noise, w_shared_gate=v.get("w_shared_gate"))
        got = {"ids": r.ids, "weights": r.weights, "counts": r.counts, "prob_sum": r.prob_sum,
               "shared_scale": r.shared_scale, "logits": r.logits}
        return {role: got[role] for role in outs}
    return kernel_step(n, params_for, render_route, launch, fills_results=False)   # it allocates its outputs


def _gemm_step(n: Node, g: Graph) -> Step:
    a = n.attr

    def params_for(tile, bucket):
        return GroupedGemmParams(num_experts=a["num_experts"], n=int(n.types[0].shape[1]),
                                 k_dim=int(g.types[n.ins["a"]].shape[1]), activation=a["activation"],
                                 glu=a["glu"], bias="bias" in n.ins, bias_up="bias_up" in n.ins,
                                 **glu_variant(a), gather_top_k=a["gather_top_k"], scatter=a["scatter"],
                                 scale="scale" in n.ins, store_pre="pre" in n.outs, out_dtype=n.types[0].torch_dtype,
                                 tile=tile, header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        scale = v.get("scale")
        grouped_gemm(v["a"], v["w"], params, out=outs["out"], offsets=v.get("offsets"), order=v.get("order"),
                     w_up=v.get("w_up"), scale_vec=scale.reshape(-1) if scale is not None else None,
                     bias=v.get("bias"), bias_up=v.get("bias_up"), pre=outs.get("pre"), pre_up=outs.get("pre_up"))
    return kernel_step(n, params_for, render_grouped_gemm, launch)


def _reduce_step(n: Node, g: Graph) -> Step:

    def params_for(tile, bucket):
        return ReduceParams(top_k=n.attr["top_k"], hidden=int(n.types[0].shape[1]), residual="residual" in n.ins,
                            out_dtype=DTYPES[n.attr["out_dtype"]], tile=tile, header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        reduce_topk(v["y"], params, out=outs["out"], ids=v["ids"], residual=v.get("residual"))
    return kernel_step(n, params_for, render_reduce, launch)


def _dispatch_step(n: Node, g: Graph) -> Step:

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
    cfg = router_config(n.attr)

    def run(v, outs, ctx):
        ids, weights = apply_capacity(v["ids"], v["weights"], v["logits"], cfg, v.get("score_bias"))
        return {"ids": ids, "weights": weights}
    return Step(n, run)


LOWERINGS = {"fused_route": _route_step, "grouped_gemm": _gemm_step, "reduce_topk": _reduce_step,
             "dispatch": _dispatch_step, "aux_loss": _aux_step, "apply_capacity": _capacity_step}
