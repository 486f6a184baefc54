"""Lowering of the MoBA kernel nodes (`moec.passes.lower` runs every node's).

``fused_block_gate`` is a kernel step: keys pooled by `moec.runtime.moba_pool.pool_keys` (a
deterministic ``O(T D)`` torch op), then the generated gate kernel; ``block_sparse_attention`` is one
generated kernel per scheme (rows: `moec.runtime.moba_attention_kernel`, densify:
`moec.runtime.moba_window_kernel`), as are the backward's ``block_sparse_attention_dq`` and
``block_sparse_attention_dkdv`` (`moec.runtime.moba_backward_kernel`). Every buffer and grid depends on shapes only (no host synchronisation).
"""
from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.runtime.moba_attention_kernel import MobaAttentionParams, moba_attention_fwd
from moec.runtime.moba_backward_kernel import MobaDkdvParams, MobaDqParams, moba_dkdv, moba_dq
from moec.runtime.moba_gate_kernel import MobaGateParams, moba_gate
from moec.runtime.moba_kernel import render_moba
from moec.runtime.moba_pool import pool_keys
from moec.runtime.moba_window_kernel import MobaWindowParams, moba_window_fwd
from moec.runtime.program import Step

from .lower_steps import header, kernel_step


def _shape(g: Graph, n: Node) -> dict:
    """What every MoBA kernel's params share, read off the node's operand types."""
    q, k = g.types[n.ins["q"]], g.types[n.ins["k"]]
    return dict(block_size=n.attr["block_size"], head_dim=int(q.shape[3]), group=int(q.shape[1]) // int(k.shape[1]),
                varlen="cu_seqlens" in n.ins, dtype=str(q.torch_dtype).replace("torch.", ""), header=header(n))


def _gate_step(n: Node, g: Graph) -> Step:
    def launch(p, v, outs, ctx):
        cu = v.get("cu_seqlens")
        pooled = pool_keys(v["k"], p.block_size, cu, v.get("kconv_weight"))
        return {"indices": moba_gate(v["q"], pooled, block_size=p.block_size, top_k=p.top_k, tile=p.tile,
                                     cu_seqlens=cu, header=p.header)}
    return kernel_step(n, lambda tile, _: MobaGateParams(top_k=n.attr["top_k"], tile=tile, **_shape(g, n)),
                       render_moba, launch, fills_results=False)


def _top_k(g: Graph, n: Node) -> int:
    return int(g.types[n.ins["indices"]].shape[3])


def _attention_step(n: Node, g: Graph) -> Step:
    fwd, params = ((moba_window_fwd, MobaWindowParams) if n.attr["scheme"] == "densify"
                   else (moba_attention_fwd, MobaAttentionParams))

    def launch(p, v, outs, ctx):
        out, lse = fwd(v["q"], v["k"], v["v"], v["indices"], block_size=p.block_size, tile=p.tile,
                       cu_seqlens=v.get("cu_seqlens"), header=p.header)
        return {"out": out, "lse": lse}
    return kernel_step(n, lambda tile, _: params(top_k=_top_k(g, n), tile=tile, **_shape(g, n)),
                       render_moba, launch, fills_results=False)


def _grad_args(v) -> tuple:
    return v["q"], v["k"], v["v"], v["indices"], v["d_out"], v["lse"], v["delta"]


def _dq_step(n: Node, g: Graph) -> Step:
    def launch(p, v, outs, ctx):
        return {"d_q": moba_dq(*_grad_args(v), block_size=p.block_size, tile=p.tile, cu_seqlens=v.get("cu_seqlens"),
                               header=p.header)}
    return kernel_step(n, lambda tile, _: MobaDqParams(top_k=_top_k(g, n), tile=tile, **_shape(g, n)),
                       render_moba, launch, fills_results=False)


def _dkdv_step(n: Node, g: Graph) -> Step:
    def launch(p, v, outs, ctx):
        dk, dv = moba_dkdv(*_grad_args(v), block_size=p.block_size, tile=p.tile, cu_seqlens=v.get("cu_seqlens"),
                           header=p.header)
        return {"d_k": dk, "d_v": dv}
    return kernel_step(n, lambda tile, _: MobaDkdvParams(top_k=_top_k(g, n), tile=tile, **_shape(g, n)),
                       render_moba, launch, fills_results=False)


LOWERINGS = {"fused_block_gate": _gate_step, "block_sparse_attention": _attention_step,
             "block_sparse_attention_dq": _dq_step, "block_sparse_attention_dkdv": _dkdv_step}
