"""Build the backward graph of an MoE layer (or of its routed experts) from the same description as its
forward (`moec.ir.build`): each forward fragment has its vector-Jacobian fragment here, written with the
backward's ops (`moec.ir.grad_ops`) and the forward's own ``grouped_gemm`` / ``reduce_topk``.

Graph inputs: ``dy`` (the output's gradient, in the layer's dtype), ``d_aux``, ``d_logits`` and
``d_weights_out`` (the gradients of the aux loss, router logits and routing weights, when the forward
returns them), the forward's inputs under their names (``x``, ``w_router`` or an external router's
``logits``, ``w_gate``...), and what
the forward saved: the routing (``ids``; ``ids_routed`` before capacity; ``ids_chosen``, the router's choices
before identity experts became dropped pairs; ``route_weights``), the dispatch
(``order``, ``offsets``) and a gated shared expert's ``shared_scale``. Outputs are named ``d_<input>``
(`grad_outputs` lists them).

Save or recompute: the gate/up products the activation reads are either saved by the forward (its fused
GEMM stores them: ``pre_gate``, ``pre_up``, when the save-activations pass chose so) and read here, or
recomputed from ``x`` (one grouped GEMM each, the permute folded into its prologue; then training holds no
more activation memory than inference plus the routing); the activation's backward, the routing weight's
gradient and ``h`` for the down projection's weight gradient come from one kernel's epilogue.

The routed experts' fragment, for ``y = sum_s w[t,s] * down_e(act(gate_e(x)) * up_e(x))``::

    %gate, %up = grouped_gemm(x, w_gate / w_up) {gather_top_k=k}               # recompute (or saved inputs)
    %d_gate, %d_up, %h, %dots = grouped_dgrad(dy, w_down, gate, up, scale=route_weights) {act_grad}
    %d_w_down, %d_b_down = grouped_wgrad(dy, h, scale=route_weights) {gather_a=k}
    %d_w_gate, %d_b_gate = grouped_wgrad(d_gate, x) {gather_b=k}               # and d_w_up
    %dx_pairs = grouped_dgrad(d_gate, w_gate, a2=d_up, w2=w_up) {scatter}       # pair order, fp32
    %d_weights = pair_weight_grad(dots, ids)                                     # d routing weights
    %d_x = reduce_topk(dx_pairs, ids, residual=<router's and shared expert's d x>)
"""
from __future__ import annotations

from ..moba.config import MobaConfig
from ..spec import MoESpec
from .build import expert_inputs
from .graph import Builder, Graph
from .ops import router_attrs
from .types import B, S, T, TensorType, dtype_name

SAVED = ("ids", "ids_routed", "ids_chosen", "route_weights", "order", "offsets", "shared_scale")
# the activation's inputs, when the forward saved them (passes/save_activations.py) rather than the
# backward recomputing them: the routed experts' gate/up products, the shared expert's
PRE_SAVED = ("pre_gate", "pre_up", "shared_pre_gate", "shared_pre_up")


def saved_values(forward: Graph) -> dict:
    """Where a forward graph (before or after its passes) holds what its backward reads: ``{saved role:
    value name}`` for the roles of `SAVED` it has (the routing from the node that produced the ids the
    dispatch sorts, the dispatch's results, a gated shared expert's scale)."""
    sorter = next(n for n in forward.nodes if n.op == "dispatch" or (n.op == "fused_route" and "order" in n.outs))
    got = {"ids": sorter.ins["ids"] if sorter.op == "dispatch" else sorter.outs["ids"],   # (fuse-dispatch)
           "order": sorter.outs["order"], "offsets": sorter.outs["offsets"]}
    producer = forward.producer(got["ids"])
    if producer is None:                                  # the routing is a graph input (routed experts)
        got["route_weights"] = "weights"
    elif producer.op == "identity_experts":          # the router's choices, identity picks included
        got["route_weights"] = producer.ins["weights"]
        got["ids_chosen"] = producer.ins["ids"]
        capacity = forward.producer(producer.ins["ids"])
        if capacity is not None and capacity.op == "apply_capacity":     # pairs passed through
            got["ids_routed"] = capacity.ins["ids"]
    else:
        got["route_weights"] = producer.outs["weights"]
        if producer.op == "apply_capacity":
            got["ids_routed"] = producer.ins["ids"]
    for n in forward.nodes:
        if n.op == "grouped_gemm" and "pre" in n.outs:
            prefix = "" if "offsets" in n.ins else "shared_"
            got[f"{prefix}pre_gate"] = n.outs["pre"]
            if "pre_up" in n.outs:
                got[f"{prefix}pre_up"] = n.outs["pre_up"]
        if "shared_scale" in n.outs:
            got["shared_scale"] = n.outs["shared_scale"]
        elif n.op == "shared_gate":
            got["shared_scale"] = n.outs["scale"]
    return got


def read_saved(forward: Graph, values: dict) -> dict:
    """``{saved role: tensor}`` from a run of ``forward`` that kept its values (`saved_values` names them)."""
    return {role: values[v] for role, v in saved_values(forward).items()}


def grad_outputs(g: Graph) -> list[str]:
    """The names of the inputs whose gradients ``g`` returns, in its output order (each output value
    is named ``d_<input>``)."""
    return [o[2:] for o in g.outputs]


def _projection_grads(b: Builder, x: str, dy: str, ws: dict, gathered: dict, scale, E: int, k: int,
                      activation: str, glu: bool, variant: dict, prefix: str = "",
                      pre: frozenset = frozenset(), scale_in: bool = False, norm_eps=None) -> tuple[str, str, dict]:
    """The VJP of one expert MLP block (gate/up grouped GEMMs, activation, down grouped GEMM, scaled by
    ``scale``, or with ``scale_in`` its input scaled by it; ``ws``: role -> the input holding it, e.g.
    ``w_down -> shared_down``):
    ``(per-row d x (fp32, pair order when routed), dots, {input: its gradient})``. The gate/up products are
    inputs when ``pre`` (the saved roles) holds them, else recomputed from ``x``. With ``norm_eps`` (routed
    experts with expert norms) the down projection's rows are recomputed too, and the norm's backward
    (`expert_norm_grad`) gives the down projection's row gradients and, in place of ``dots``, the routing
    weights' gradient."""
    routed = {k_: v for k_, v in gathered.items() if v is not None}
    gather = k if routed else 0
    first = "w_gate" if glu else "w_up"
    first_b = "b_gate" if glu else "b_up"
    if f"{prefix}pre_gate" in pre:          # saved by the forward
        t = b.types[ws[first]]
        rows = TensorType(t.dtype, (T * k if routed else T, t.shape[1]))
        gate = b.input(f"{prefix}pre_gate", rows)
        up = b.input(f"{prefix}pre_up", rows) if glu else None
    else:
        gate = b.add("grouped_gemm", {"a": x, "w": ws[first], "bias": ws.get(first_b), **routed},
                     {"num_experts": E, "gather_top_k": gather}, names={"out": f"{prefix}gate_re"})["out"]
        up = (b.add("grouped_gemm", {"a": x, "w": ws["w_up"], "bias": ws.get("b_up"), **routed},
                    {"num_experts": E, "gather_top_k": gather}, names={"out": f"{prefix}up_re"})["out"] if glu else None)
    grads = {}
    a_down, down_rows, down_scale, down_gather, dots = dy, routed, scale, gather, None
    if norm_eps is not None:            # expert norms: the norm's backward needs the down projection's rows
        h = b.add("activate", {"gate": gate, "up": up}, {"activation": activation, "glu": glu, **variant},
                  names={"out": "h_norm_re"})["out"]
        ys = b.add("grouped_gemm", {"a": h, "w": ws["w_down"], "bias": ws.get("b_down"), "offsets": routed["offsets"]},
                   {"num_experts": E}, names={"out": "ys_re"})["out"]
        en = b.add("expert_norm_grad", {"y": ys, "w": ws["w_expert_norm"], "dy": dy, "order": routed["order"],
                                        "offsets": routed["offsets"], "weights": scale}, {"eps": norm_eps, "top_k": k},
                   names={"d_y": "d_ys_rows", "d_w": "d_w_expert_norm", "d_weights": "d_route_weights"})
        grads[ws["w_expert_norm"]] = en["d_w"]
        # the down projection's rows' gradients are given in expert order: no gather, no scale
        a_down, down_rows, down_scale, down_gather, dots = en["d_y"], {"offsets": routed["offsets"]}, None, 0, \
            en["d_weights"]
    dg = b.add("grouped_dgrad", {"a": a_down, "w": ws["w_down"], "gate": gate, "up": up, "scale": down_scale,
                                 **down_rows},
               {"num_experts": E, "gather_top_k": down_gather, "act_grad": True, "activation": activation,
                "glu": glu, **variant, **({"scale_in": True} if scale_in else {})},
               names={"out": f"{prefix}d_gate_rows", "out2": f"{prefix}d_up_rows", "h": f"{prefix}h_re",
                      "dots": f"{prefix}dots"},
               results=["out", "h", "dots"] + (["out2"] if glu else []))
    d_first, d_up = dg["out"], dg.get("out2")
    for role, bias, a, rows, attrs in (("w_down", "b_down", a_down, dg["h"], {"gather_a": down_gather}),
                                       (first, first_b, d_first, x, {"gather_b": gather}),
                                       ("w_up", "b_up", d_up, x, {"gather_b": gather})):
        if a is None or ws[role] in grads:
            continue
        at = down_rows if role == "w_down" else routed
        got = b.add("grouped_wgrad", {"a": a, "b": rows, "scale": down_scale if role == "w_down" and not scale_in
                                      else None, **at},
                    {"num_experts": E, **attrs}, names={"out": f"d_{ws[role]}", "dbias": f"d_{ws.get(bias)}"},
                    results=["out"] + (["dbias"] if bias in ws else []))
        grads[ws[role]] = got["out"]
        if bias in ws:
            grads[ws[bias]] = got["dbias"]
    dx = b.add("grouped_dgrad", {"a": d_first, "w": ws[first], "a2": d_up, "w2": ws["w_up"] if glu else None,
                                 **routed}, {"num_experts": E, "scatter": bool(routed), "out_dtype": "f32"},
               names={"out": f"{prefix}dx_rows"})["out"]
    return dx, dots if dots is not None else dg["dots"], grads


def routed_experts_grad(b: Builder, x: str, dy: str, ws: dict, E: int, k: int, activation: str, glu: bool,
                        variant: dict, bias: bool, pre: frozenset = frozenset(),
                        input_scaled: bool = False, norm_eps=None) -> tuple[str, str, dict]:
    """The VJP of `moec.ir.build.routed_experts` given the saved routing: ``(d x pairs [T*k, d] fp32 in
    pair order, d routing weights [T, k] fp32, {weight input: its gradient})``."""
    ids = b.input("ids", TensorType("i32", (T, k)))
    weights = b.input("route_weights", TensorType("f32", (T, k)))
    order = b.input("order", TensorType("i32", (T * k,)))
    offsets = b.input("offsets", TensorType("i32", (E + 1,)))
    dx, dots, grads = _projection_grads(b, x, dy, ws, {"offsets": offsets, "order": order}, weights, E, k,
                                        activation, glu, variant, pre=pre, scale_in=input_scaled, norm_eps=norm_eps)
    if norm_eps is not None:            # the norm's backward gave the routing weights' gradient
        return dx, dots, grads
    dw = b.add("pair_weight_grad", {"dots": dots, "ids": ids, "dy": dy if bias else None,
                                    "b_down": ws.get("b_down") if bias else None}, {"top_k": k},
               names={"out": "d_route_weights"})["out"]
    return dx, dw, grads


def build_moe_backward_graph(spec: MoESpec, dtype, outputs=("y",), pre: tuple = ()) -> Graph:
    """The backward of `moec.ir.build.build_moe_graph` ``(spec, dtype, outputs)`` for the gradients of
    ``y`` (and ``aux`` when among ``outputs``); ``pre``: the roles of `PRE_SAVED` the forward saved (read,
    not recomputed); see the module docstring."""
    pre = frozenset(pre)
    dt = dtype_name(dtype)
    r = spec.router
    E, k, d, f = r.num_experts, r.top_k, spec.hidden, spec.ffn
    Ef = spec.ffn_experts
    b = Builder("moe_backward")
    dy = b.input("dy", TensorType(dt, (T, d)))
    d_aux = b.input("d_aux", TensorType("f32", ())) if "aux" in outputs else None
    x = b.input("x", TensorType(dt, (T, d)))
    external = spec.external_router
    if external and "logits" in outputs:
        raise ValueError("an external router's logits are its own output (autograd differentiates it), "
                         "not the program's")
    logits = b.input("logits", TensorType("f32", (T, E))) if external else None
    w_router = None if external else b.input("w_router", TensorType(dt, (E, d)))
    b_router = b.input("b_router", TensorType(dt, (E,))) if r.router_bias else None
    w_noise = b.input("w_noise", TensorType(dt, (E, d))) if r.noisy else None
    ws = {n: v for n, v in expert_inputs(b, Ef, d, f, dt, spec.glu, spec.expert_bias,
                                         spec.expert_norm is not None).items() if v is not None}
    dx_pairs, d_weights, grads = routed_experts_grad(b, x, dy, ws, Ef, k, spec.activation, spec.glu,
                                                     spec.glu_variant, spec.expert_bias, pre, spec.input_scaled,
                                                     spec.expert_norm)
    chosen, dx_identity = "ids", None
    passing = r.dropped == "pass"
    if spec.identity_experts or passing:  # identity picks / passed pairs: d weight = x . dy, d x += dy * weights
        if spec.identity_experts:
            chosen = b.input("ids_chosen", TensorType("i32", (T, k)))
        ig = b.add("identity_experts_grad", {"x": x, "dy": dy, "ids": chosen, "weights": "route_weights"},
                   {"ffn_experts": Ef, "dropped": passing},
                   names={"d_weights": "d_identity_weights", "dx": "dx_identity"})
        d_weights = b.add("add", {"a": d_weights, "b": ig["d_weights"]}, names={"out": "d_route_weights_ffn_id"})["out"]
        dx_identity = ig["dx"]
    ids_routed = b.input("ids_routed", TensorType("i32", (T, k))) if r.has_capacity else None
    d_logits = b.input("d_logits", TensorType("f32", (T, E))) if "logits" in outputs else None
    if "weights" in outputs:             # the routing weights are an output too: their gradient adds up
        d_out = b.input("d_weights_out", TensorType("f32", (T, k)))
        d_weights = b.add("add", {"a": d_weights, "b": d_out}, names={"out": "d_route_weights_all"})["out"]
    routing = {"ids": chosen, "ids_routed": ids_routed, "d_weights": d_weights, "d_aux": d_aux}
    if external:                         # the logits' gradient is an output: autograd takes it through the router
        grads["logits"] = b.add("route_grad", {"logits": logits, **routing}, router_attrs(r),
                                names={"d_logits": "d_logits"})["d_logits"]
        residual = dx_identity
    else:
        rg = b.add("router_grad", {"x": x, "w": w_router, "b": b_router, "w_noise": w_noise, **routing,
                                   "d_logits": d_logits}, router_attrs(r),
                   names={"dx": "dx_router", "dw": "d_w_router", "db": "d_b_router", "dw_noise": "d_w_noise"},
                   results=["dx", "dw"] + (["db"] if r.router_bias else []) + (["dw_noise"] if r.noisy else []))
        grads.update({"w_router": rg["dw"], "b_router": rg.get("db"), "w_noise": rg.get("dw_noise")})
        residual = rg["dx"]
        if dx_identity is not None:
            residual = b.add("add", {"a": residual, "b": dx_identity}, names={"out": "dx_router_identity"})["out"]
    if spec.shared is not None:
        fs = spec.shared.width
        sw = {"w_up": b.input("shared_up", TensorType(dt, (1, fs, d))),
              "w_down": b.input("shared_down", TensorType(dt, (1, d, fs)))}
        if spec.glu:
            sw["w_gate"] = b.input("shared_gate", TensorType(dt, (1, fs, d)))
        scale = b.input("shared_scale", TensorType("f32", (T,))) if spec.shared.gated else None
        s_dx, s_dots, s_grads = _projection_grads(b, x, dy, sw, {}, scale, 1, k, spec.activation, spec.glu,
                                                  spec.shared_variant, prefix="shared_", pre=pre)
        grads.update(s_grads)
        residual = s_dx if residual is None else \
            b.add("add", {"a": residual, "b": s_dx}, names={"out": "dx_router_shared"})["out"]
        if spec.shared.gated:
            w_sg = b.input("shared_gate_proj", TensorType(dt, (1, d)))
            sg = b.add("shared_gate_grad", {"x": x, "w": w_sg, "scale": scale, "dots": s_dots},
                       names={"dx": "dx_shared_gate", "dw": "d_shared_gate_proj"})
            grads["shared_gate_proj"] = sg["dw"]
            residual = b.add("add", {"a": residual, "b": sg["dx"]}, names={"out": "dx_gates"})["out"]
    d_x = b.add("reduce_topk", {"y": dx_pairs, "ids": "ids", "residual": residual}, {"top_k": k, "out_dtype": dt},
                names={"out": "d_x"})["out"]
    return _finish(b, {"x": d_x, **grads})


def build_experts_backward_graph(E: int, k: int, d: int, f: int, activation: str, glu: bool, dtype,
                                 bias: bool = False, variant: tuple = (), pre: tuple = ()) -> Graph:
    """The backward of `moec.ir.build.build_experts_graph` (the routing is an input: its weights get a
    gradient, ``d_weights``)."""
    dt = dtype_name(dtype)
    b = Builder("experts_backward")
    dy = b.input("dy", TensorType(dt, (T, d)))
    x = b.input("x", TensorType(dt, (T, d)))
    ws = {n: v for n, v in expert_inputs(b, E, d, f, dt, glu, bias).items() if v is not None}
    dx_pairs, d_weights, grads = routed_experts_grad(b, x, dy, ws, E, k, activation, glu, dict(variant), bias,
                                                     frozenset(pre))
    d_x = b.add("reduce_topk", {"y": dx_pairs, "ids": "ids"}, {"top_k": k, "out_dtype": dt},
                names={"out": "d_x"})["out"]
    return _finish(b, {"x": d_x, "route_weights": d_weights, **grads})


def build_moba_backward_graph(cfg: MobaConfig, dtype, *, varlen: bool = False) -> Graph:
    """The backward of a MoBA core (`moec.ir.build.build_moba_graph`) given the forward's ``out``, ``lse`` and
    selected ``indices``: ``d_q``, ``d_k``, ``d_v`` from ``d_out`` and ``d_lse`` (the gate's selection has no
    gradient, as in MoBA; the key convolution feeds only the selection)::

        %delta = attention_delta(out, d_out, d_lse)
        %d_q = block_sparse_attention_dq(q, k, v, indices, d_out, lse, delta)      # query-tile-major
        %d_k, %d_v = block_sparse_attention_dkdv(q, k, v, indices, d_out, lse, delta)  # key-block-major
    """
    dt = dtype_name(dtype)
    b = Builder("moba_backward")
    qt = TensorType(dt, (B, cfg.heads, T, cfg.head_dim))
    kt = TensorType(dt, (B, cfg.kv_heads, T, cfg.head_dim))
    q, k, v = b.input("q", qt), b.input("k", kt), b.input("v", kt)
    cu = b.input("cu_seqlens", TensorType("i32", (S + 1,))) if varlen else None
    idx = b.input("indices", TensorType("i32", (B, cfg.heads, T, cfg.top_k)))
    out, lse = b.input("out", qt), b.input("lse", TensorType("f32", (B, cfg.heads, T)))
    d_out, d_lse = b.input("d_out", qt), b.input("d_lse", TensorType("f32", (B, cfg.heads, T)))
    delta = b.add("attention_delta", {"out": out, "d_out": d_out, "d_lse": d_lse})["delta"]
    ins = {"q": q, "k": k, "v": v, "indices": idx, "d_out": d_out, "lse": lse, "delta": delta, "cu_seqlens": cu}
    bs = {"block_size": cfg.block_size}
    dq = b.add("block_sparse_attention_dq", ins, bs)["d_q"]
    dkv = b.add("block_sparse_attention_dkdv", ins, bs)
    return _finish(b, {"q": dq, "k": dkv["d_k"], "v": dkv["d_v"]})


def _finish(b: Builder, grads: dict) -> Graph:
    """The graph returning ``grads`` (input -> its gradient's value, named ``d_<input>``) in input order."""
    return b.graph([grads[n] for n, _ in b.inputs if grads.get(n) is not None])
