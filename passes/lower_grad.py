"""Lowering of the backward's kernel nodes (`moec.passes.lower` runs every node's).

``grouped_dgrad`` and ``grouped_wgrad`` are generated Triton kernels (`moec.runtime.grouped_grad_kernel`);
a ``grouped_dgrad``'s weight operand is the forward's, passed as its transpose (a view). The router's and
the shared gate's backward (``router_grad``, ``shared_gate_grad``) and ``pair_weight_grad`` run as torch
steps (the reference interpreter's code: a [T, E] softmax backward and the router's own matmuls).
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.ops import glu_variant
from moec.runtime.grouped_grad_kernel import (GroupedDgradParams, GroupedWgradParams, grouped_dgrad, grouped_wgrad,
                                              render_grouped_dgrad, render_grouped_wgrad)
from moec.runtime.launch import cdiv

from .lower_steps import header, kernel_step


def _dgrad_step(n: Node, g: Graph):
    a = n.attr

    def params_for(tile, bucket):
        return GroupedDgradParams(num_experts=a["num_experts"], n=int(n.types[0].shape[1]),
                                  k_dim=int(g.types[n.ins["a"]].shape[1]), gather_top_k=a["gather_top_k"],
                                  two="a2" in n.ins, act_grad=a["act_grad"], activation=a["activation"],
                                  glu=a["glu"], **glu_variant(a), scale="scale" in n.ins, scale_in=a["scale_in"],
                                  store_h="h" in n.outs,
                                  scatter=a["scatter"], out_dtype=n.types[0].torch_dtype, tile=tile,
                                  header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        dots = outs.get("dots")
        if dots is not None:        # columns past this tile's count stay zero
            dots[:, cdiv(params.n, params.tile.block_n):].zero_()
        w2 = v.get("w2")
        grouped_dgrad(v["a"], v["w"].transpose(1, 2), params, out=outs["out"], offsets=v.get("offsets"),
                      order=v.get("order"), a2=v.get("a2"), w2=w2.transpose(1, 2) if w2 is not None else None,
                      gate=v.get("gate"), up=v.get("up"), out2=outs.get("out2"), h=outs.get("h"), dots=dots,
                      scale_vec=v.get("scale"))
    return kernel_step(n, params_for, render_grouped_dgrad, launch)


def _wgrad_step(n: Node, g: Graph):
    a = n.attr

    def params_for(tile, bucket):
        return GroupedWgradParams(num_experts=a["num_experts"], n=int(n.types[0].shape[1]),
                                  k_dim=int(n.types[0].shape[2]), gather_a=a["gather_a"], gather_b=a["gather_b"],
                                  scale="scale" in n.ins, dbias="dbias" in n.outs, out_dtype=n.types[0].torch_dtype,
                                  tile=tile, header=header(n), bucket=bucket)

    def launch(params, v, outs, ctx):
        grouped_wgrad(v["a"], v["b"], params, out=outs["out"], offsets=v.get("offsets"), order=v.get("order"),
                      scale_vec=v.get("scale"), dbias=outs.get("dbias"))
    return kernel_step(n, params_for, render_grouped_wgrad, launch)


LOWERINGS = {"grouped_dgrad": _dgrad_step, "grouped_wgrad": _wgrad_step}
