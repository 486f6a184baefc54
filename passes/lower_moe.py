"""Lowering of the MoE kernel nodes (`moec.passes.lower` runs every node's).

``fused_route``, ``grouped_gemm`` and ``reduce_topk`` are generated Triton kernels per token-count
bucket of their ``tiles``; ``dispatch`` and ``aux_loss`` are device-side torch steps (sort / a few
element-wise ops, no host sync); ``apply_capacity`` is a torch step too (its greedy, token-ordered
overflow needs a global order; `moec.runtime.capacity` computes it with fixed-shape ops, so it does
not synchronise either).
"""
from __future__ import annotations

import dataclasses


from moec.ir.graph import Graph, Node
from moec.ir.ops import glu_variant, router_config
from moec.ir.tiles import at_bucket
from moec.ir.types import DTYPES
from moec.reference import aux_from_counts
from moec.runtime.capacity import apply_capacity
from moec.runtime.dispatch import dispatch
from moec.runtime.expert_norm_kernel import ExpertNormLaunch, ExpertNormParams, render_expert_norm
from moec.runtime.grouped_gemm_kernel import (GroupedGemmLaunch, GroupedGemmParams, bound_weights, grouped_gemm,
                                             render_grouped_gemm)
from moec.runtime.program import Step
from moec.runtime.schedule_kernel import ScheduleParams, render_schedule, schedule_launch
from moec.runtime.reduce_kernel import ReduceLaunch, ReduceParams, reduce_topk, render_reduce
from moec.runtime.route_kernel import RouteLaunch, RouteParams, check_route_weights, fused_route, render_route

from .lower_steps import header, kernel_step


def _route_step(n: Node, g: Graph) -> Step:
    cfg = router_config(n.attr)
    weights = ("w", "b", "score_bias", "w_noise", "w_shared_gate")
    sort = "order" in n.outs            # fuse-dispatch: the kernel groups the pairs by expert too
    schedule = n.attr["schedule_block_m"] if "schedule" in n.outs else None     # schedule-tiles
    given = "logits" in n.ins           # an external router's logits, read by the kernel
    x_name = n.ins["logits" if given else "x"]
    choices_name = n.ins.get("choices")     # a token table's choices: weighted, not ranked

    def params_for(tile, bucket):
        return RouteParams(router=cfg, hidden=0 if given else int(g.types[x_name].shape[1]),
                           shared_gate="w_shared_gate" in n.ins, write_logits="logits" in n.outs,
                           write_counts="counts" in n.outs, tile=tile, header=header(n), bucket=bucket,
                           logits_in=given, choices_in=choices_name is not None)

    def noise_of(ctx):
        if not (cfg.noisy and ctx["training"]):
            return None
        if ctx["noise"] is None:
            raise ValueError("noisy router in training mode: no noise tensor was drawn")
        return ctx["noise"]

    def results(r) -> dict:
        got = {"ids": r.ids, "weights": r.weights, "counts": r.counts, "prob_sum": r.prob_sum,
               "shared_scale": r.shared_scale, "logits": r.logits, "order": r.order, "offsets": r.offsets,
               "schedule": r.schedule}
        return {v: got[role] for role, v in n.results}

    def launch(params, v, outs, ctx):
        r = fused_route(v["logits" if given else "x"], v.get("w"), params, b_router=v.get("b"),
                        score_bias=v.get("score_bias"),
                        w_noise=v.get("w_noise"), noise=noise_of(ctx), w_shared_gate=v.get("w_shared_gate"),
                        dispatch=sort, schedule=schedule, choices=v.get("choices"))
        got = results(r)
        return {role: got[v] for role, v in n.results}

    def prepare(params, bound):
        if any(r in n.ins and r not in bound for r in weights):
            return None
        check_route_weights(params, bound.get("w"), bound.get("b"), bound.get("score_bias"), bound.get("w_noise"),
                            bound.get("w_shared_gate"))
        plan = RouteLaunch(params, bound.get("w"), bound.get("b"), bound.get("score_bias"), bound.get("w_noise"),
                           bound.get("w_shared_gate"), dispatch=sort, schedule=schedule)

        def go(env, ctx):
            env.update(results(plan(env[x_name], noise_of(ctx), env[choices_name] if choices_name else None)))
        return go
    step = kernel_step(n, params_for, render_route, launch, fills_results=False, prepare=prepare)  # (it allocates)
    return dataclasses.replace(step, helpers=_schedule_kernels(n))


def _gemm_step(n: Node, g: Graph) -> Step:
    a = n.attr
    names = {r: n.ins.get(r) for r in ("a", "offsets", "order", "scale", "schedule")}
    # the schedule's BLOCK_M per bucket: a candidate tile of other rows (autotune) scans the offsets instead
    sched_m = g.producer(names["schedule"]).attr["schedule_block_m"] if names["schedule"] else None

    def scheduled(params, T: int) -> bool:
        return sched_m is not None and at_bucket(sched_m, T) == params.tile.block_m

    out_names = {r: n.outs.get(r) for r in ("out", "pre", "pre_up")}

    def params_for(tile, bucket):
        return GroupedGemmParams(num_experts=a["num_experts"], n=int(n.types[0].shape[1]),
                                 k_dim=int(g.types[n.ins["a"]].shape[1]), activation=a["activation"],
                                 glu=a["glu"], bias="bias" in n.ins, bias_up="bias_up" in n.ins,
                                 **glu_variant(a), gather_top_k=a["gather_top_k"], scatter=a["scatter"],
                                 scale="scale" in n.ins, scale_in=a["scale_in"], store_pre="pre" in n.outs,
                                 out_dtype=n.types[0].torch_dtype,
                                 tile=tile, header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        scale = v.get("scale")
        grouped_gemm(v["a"], v["w"], params, out=outs["out"], offsets=v.get("offsets"), order=v.get("order"),
                     w_up=v.get("w_up"), scale_vec=scale.reshape(-1) if scale is not None else None,
                     bias=v.get("bias"), bias_up=v.get("bias_up"), pre=outs.get("pre"), pre_up=outs.get("pre_up"),
                     schedule=v.get("schedule") if scheduled(params, ctx["T"]) else None)

    def prepare(params, bound):
        if any(r in n.ins and r not in bound for r in ("w", "w_up", "bias", "bias_up")):
            return None
        with_schedule = scheduled(params, params.bucket[0] if params.bucket else 1)     # (a variant's bucket)
        plan = GroupedGemmLaunch(params, *bound_weights(params, bound["w"], bound.get("w_up"), bound.get("bias"),
                                                        bound.get("bias_up")), names["offsets"] is not None,
                                 _contiguous(g, n.ins["a"]), _contiguous(g, n.outs["out"]),
                                 schedule=with_schedule)
        a_, off_, order_, scale_ = names["a"], names["offsets"], names["order"] if params.routed else None, names["scale"]
        sched_ = names["schedule"] if with_schedule else None
        out_, pre_, pre_up_ = out_names["out"], out_names["pre"], out_names["pre_up"]
        gather = params.gather_top_k

        def go(env, ctx):
            x = env[a_]
            order = env[order_] if order_ else None
            scale = env[scale_] if scale_ else None
            if scale is not None and not scale.is_contiguous():     # (a contiguous [T, k] is its flat pairs)
                scale = scale.reshape(-1)
            M = order.shape[0] if order is not None else x.shape[0] * (gather or 1)
            plan(x, env[out_], env[off_] if off_ else None, order, scale, env[pre_] if pre_ else None,
                 env[pre_up_] if pre_up_ else None, M, env[sched_] if sched_ else None)
        return go
    return kernel_step(n, params_for, render_grouped_gemm, launch, prepare=prepare)


def _reduce_step(n: Node, g: Graph) -> Step:
    y_, ids_, res_, out_ = n.ins["y"], n.ins["ids"], n.ins.get("residual"), n.outs["out"]

    def params_for(tile, bucket):
        return ReduceParams(top_k=n.attr["top_k"], hidden=int(n.types[0].shape[1]), residual="residual" in n.ins,
                            out_dtype=DTYPES[n.attr["out_dtype"]], tile=tile, header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        reduce_topk(v["y"], params, out=outs["out"], ids=v["ids"], residual=v.get("residual"))

    def prepare(params, bound):
        strides = [_contiguous(g, v) if v else (0, 0) for v in (y_, ids_, res_, out_)]
        plan = ReduceLaunch(params, ids=True, strides=sum(strides, ()) if all(strides) else None)

        def go(env, ctx):
            out = env[out_]
            plan(env[y_], env[ids_], env[res_] if res_ else None, out, out.shape[0])
        return go
    return kernel_step(n, params_for, render_reduce, launch, prepare=prepare)


def _contiguous(g: Graph, value: str):
    """The strides of ``value`` when a kernel step makes it (kernels' results are allocated contiguous,
    from their types), else None (a graph input or a torch step's result: any strides)."""
    producer = g.producer(value)
    shape = g.types[value].shape
    if producer is None or "tiles" not in producer.attr or not shape or not all(d.is_Integer for d in shape[1:]):
        return None
    strides, step = [], 1
    for d in reversed(shape[1:]):
        strides.append(step)
        step *= int(d)
    return (step, *reversed(strides))


def _dispatch_step(n: Node, g: Graph) -> Step:
    E = n.attr["num_experts"]
    block_m = n.attr["schedule_block_m"] if "schedule" in n.outs else None     # schedule-tiles
    schedulers = {b: schedule_launch(ScheduleParams(E, m, header(n))) for b, m in (block_m or {}).items()}

    def run(v, outs, ctx):
        order, offsets = dispatch(v["ids"], E)
        if block_m is None:
            return {"order": order, "offsets": offsets}
        return {"order": order, "offsets": offsets,
                "schedule": at_bucket(schedulers, v["ids"].shape[0])(offsets, order.shape[0])}
    return Step(n, run, helpers=_schedule_kernels(n))


def _schedule_kernels(n: Node) -> tuple:
    """The tile schedule kernels a dispatching step may launch (one per distinct BLOCK_M), for dumps."""
    block_m = n.attr["schedule_block_m"] if "schedule" in n.outs else {}
    return tuple(render_schedule(ScheduleParams(n.attr["num_experts"], m, header(n)))
                 for m in dict.fromkeys(block_m.values()))


def _aux_step(n: Node, g: Graph) -> Step:
    E = n.attr["num_experts"]

    def run(v, outs, ctx):
        return {"out": aux_from_counts(v["counts"], v["prob_sum"], v["ids"], E, n.attr["first_choice"])}
    return Step(n, run)


def _capacity_step(n: Node, g: Graph) -> Step:
    cfg = router_config(n.attr)

    def run(v, outs, ctx):
        ids, weights = apply_capacity(v["ids"], v["weights"], v["logits"], cfg, v.get("score_bias"),
                                      ctx.get("group_size"))
        return {"ids": ids, "weights": weights}
    return Step(n, run)


def _expert_norm_step(n: Node, g: Graph) -> Step:
    def params_for(tile, bucket):
        E, d = (int(s) for s in g.types[n.ins["w"]].shape)
        return ExpertNormParams(num_experts=E, hidden=d, eps=n.attr["eps"], scatter=n.attr["scatter"], tile=tile,
                                header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        ExpertNormLaunch(params)(v["y"], v["w"], v["offsets"], outs["out"], v.get("order"), v.get("weights"))

    def prepare(params, bound):
        plan = ExpertNormLaunch(params)
        names = n.ins

        def go(env, ctx):
            plan(env[names["y"]], env[names["w"]], env[names["offsets"]], env[n.outs["out"]],
                 env.get(names.get("order")), env.get(names.get("weights")))
        return go
    return kernel_step(n, params_for, render_expert_norm, launch, prepare=prepare)


LOWERINGS = {"fused_route": _route_step, "grouped_gemm": _gemm_step, "reduce_topk": _reduce_step,
             "expert_norm": _expert_norm_step,
             "dispatch": _dispatch_step, "aux_loss": _aux_step, "apply_capacity": _capacity_step}
