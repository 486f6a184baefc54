"""The backward's IR ops (an MoE layer's gradients), registered into moec's one op registry
(`moec.ir.ops.OPS`), with their interpreter semantics and verifier rules. `moec.ir.backward` builds
graphs of them from a forward's; shapes and pair order as in `moec.ir.ops`.

- ``grouped_dgrad(a, w, ...)``: row ``i`` of the sorted rows: ``acc = A_i @ w[e]`` with ``w`` in the
  forward's ``[E, n, m]`` layout (the forward GEMM's transpose, read through strides; ``out`` has
  ``m`` columns), ``A_i = a[order[i] // gather_top_k]`` when gathering; ``+ a2_i @ w2[e]`` with ``a2``.
  With ``act_grad`` (the activation's backward, ``gate``/``up`` the forward's pre-activation rows):
  ``h = act(gate) * up`` (or ``act(gate)``, `moec.reference.gated` with the GLU variant), ``dots[p, j]``
  the partial sums over column tile ``j`` of ``acc * h`` at pair ``p = order[i]`` (routed) or row ``i``,
  then with ``s`` the row's scale (1 without): ``out = d gate``, ``out2 = d up`` of ``h`` at ``s * acc``.
  With ``scale_in`` (experts whose input ``s`` scales): ``h = act(s gate) * (s up)``, ``out``/``out2`` the
  gradients of ``gate``/``up`` at ``acc``, and ``dots`` hold ``d s`` (``sum d(s gate) gate + d(s up) up``).
  Else ``out = acc`` (at row ``order[i]`` with ``scatter``). Dropped pairs' rows are not written.
- ``grouped_wgrad(a, b, ...)``: ``out[e] = sum over expert e's rows i of A_i^T B_i`` (``[E, a cols,
  b cols]``), ``A_i = a[order[i] // gather_a]`` (or ``a[i]``), times ``scale.flat[order[i]]`` (or
  ``scale[i]`` without offsets); ``dbias[e]`` the column sums of the ``A_i``.
- ``pair_weight_grad(dots, ...)``: the routing weights' gradient ``[T, k]``: the row sums of ``dots``
  (``dy[t] . (h W_down^T)`` per pair), plus ``dy[t] . b_down[ids[t, s]]`` with expert biases.
- ``router_grad``: the router's backward from the routing weights' (and the aux loss's, and the logits')
  gradient, given the forward's choices (`moec.reference.route_backward`, the derivative of
  `moec.reference.weights_given_ids` written out): ``dx`` (fp32), the router's weight gradients.
- ``expert_norm_grad``: the expert norms' backward with the weighted combine's (d of the pre-norm rows, of the
  norm weights and of the routing weights).
- ``route_grad``: the same from given logits (an external router's): their gradient ``d_logits``.
- ``shared_gate_grad``: a sigmoid-gated shared expert's gate backward from its ``dots``.

MoBA (shapes as in `moec.ir.moba_ops`; the selection ``indices`` has no gradient):

- ``attention_delta(out, d_out, d_lse?)``: ``f32[B, H, T]`` = ``rowsum(d_out * out) - d_lse``.
- ``block_sparse_attention_dq(q, k, v, indices, d_out, lse, delta, cu_seqlens?) {block_size}``: ``d q`` of
  ``block_sparse_attention`` (query-tile-major kernel).
- ``block_sparse_attention_dkdv(...)``: its ``d k``, ``d v`` (key-block-major kernel, FlashMoBA's densified
  backward).
"""
from __future__ import annotations

import torch

from .. import reference as ref
from ..moba import reference as moba_ref
from .interp import impl
from .ops import KERNEL_ATTRS, REQUIRED, ROUTER_FIELDS, _ROUTER_DEFAULTS, IRError, check_activation, glu_variant, op, \
    router_config
from ..spec import GLU_PLAIN
from .types import TensorType
from .verify import RULES, _variant_ok


def dot_columns(cols: int) -> int:
    """Columns of ``grouped_dgrad``'s ``dots``: one per column tile of the narrowest tile (16); a kernel
    with wider tiles fills the first ``cdiv(cols, BLOCK_N)`` and zeros the rest."""
    return -(-cols // 16)


def _infer_dgrad(o, a):
    rows = o["a"].shape[0] * a["gather_top_k"] if a["gather_top_k"] else o["a"].shape[0]
    cols = o["w"].shape[2]
    dt = a["out_dtype"] or o["a"].dtype
    out = {"out": TensorType(dt, (rows, cols))}
    if a["act_grad"]:
        out.update(out2=TensorType(dt, (rows, cols)), h=TensorType(dt, (rows, cols)),
                   dots=TensorType("f32", (rows, dot_columns(int(cols)))))
    return out


op("grouped_dgrad", "acc = A_i @ w[e] (+ a2_i @ w2[e]) over expert-sorted rows, w in the forward's layout; "
   "act_grad: the activation's backward epilogue (d gate, d up, h, partial dots); else out = acc, scattered "
   "to pair order with scatter. scale_in (experts whose input the routing weight s scales): the activation "
   "reads s * gate and s * up, acc is not scaled, d gate / d up are s times the pre-activations' gradients and "
   "the dots are d s. See moec.ir.grad_ops.",
   ["a", "w"], ["out", "out2", "h", "dots"], _infer_dgrad,
   optional_operands=["offsets", "order", "a2", "w2", "gate", "up", "scale"],
   optional_results=["out2", "h", "dots"],
   attrs={"num_experts": REQUIRED, "gather_top_k": 0, "scatter": False, "act_grad": False, "activation": None,
          "glu": False, **GLU_PLAIN, "scale_in": False, "out_dtype": None, **KERNEL_ATTRS})


def _infer_wgrad(o, a):
    E, n, m = a["num_experts"], o["a"].shape[1], o["b"].shape[1]
    dt = a["out_dtype"] or o["a"].dtype
    return {"out": TensorType(dt, (E, n, m)), "dbias": TensorType(dt, (E, n))}


op("grouped_wgrad", "out[e] = sum over expert e's rows of A_i^T B_i (gathered, routing-weight scaled); "
   "dbias[e]: the column sums of A_i. See moec.ir.grad_ops.",
   ["a", "b"], ["out", "dbias"], _infer_wgrad, optional_operands=["offsets", "order", "scale"],
   optional_results=["dbias"],
   attrs={"num_experts": REQUIRED, "gather_a": 0, "gather_b": 0, "out_dtype": None, **KERNEL_ATTRS})

op("pair_weight_grad", "d weights [T, k]: the row sums of dots (+ dy[t] . b_down[ids[t, s]] with expert "
   "biases; 0 for dropped pairs).",
   ["dots", "ids"], ["out"], lambda o, a: {"out": TensorType("f32", o["ids"].shape)},
   optional_operands=["dy", "b_down"], attrs={"top_k": REQUIRED})


def _infer_router_grad(o, a):
    out = {"dx": TensorType("f32", o["x"].shape), "dw": o["w"]}
    if "b" in o:
        out["db"] = o["b"]
    if "w_noise" in o:
        out["dw_noise"] = o["w_noise"]
    return out


op("router_grad", "The router's backward given the forward's choices ids (and ids_routed before capacity): "
   "d x (fp32) and the gradients of w, b, w_noise from d_weights [T, k], d_aux (the load-balancing "
   "loss's) and d_logits (the noise-free logits' when the forward returns them), through "
   "moec.reference.weights_given_ids; the choices have no gradient.",
   ["x", "w", "ids", "d_weights"], ["dx", "dw", "db", "dw_noise"], _infer_router_grad,
   optional_operands=["b", "w_noise", "ids_routed", "d_aux", "d_logits"], optional_results=["db", "dw_noise"],
   attrs={**{n: REQUIRED for n in ("num_experts", "top_k")}, **_ROUTER_DEFAULTS})

op("expert_norm_grad", "The VJP of expert_norm followed by the weighted combine, given the pre-norm rows y "
   "sorted by expert (offsets; pair order[i] at row i), the routing weights and dy [T, d]: d_y (rows, y's dtype) "
   "of dn = weights[p] * dy[t] through the norm, d_w [E, d] (fp32) the sum over an expert's rows of dn * "
   "rmsnorm(y), d_weights [T, k] (fp32) = dy[t] . normed row (0 for pairs no row holds).",
   ["y", "w", "dy", "order", "offsets", "weights"], ["d_y", "d_w", "d_weights"],
   lambda o, a: {"d_y": o["y"], "d_w": TensorType("f32", o["w"].shape), "d_weights": o["weights"]},
   attrs={"eps": REQUIRED, "top_k": REQUIRED})

op("route_grad", "The route's backward given the forward's logits [T, E] and choices ids (and ids_routed before "
   "capacity): d logits (fp32) from d_weights [T, k] and d_aux (the load-balancing loss's), through "
   "moec.reference.weights_given_ids (an external router's: autograd takes it on through the router).",
   ["logits", "ids", "d_weights"], ["d_logits"], lambda o, a: {"d_logits": TensorType("f32", o["logits"].shape)},
   optional_operands=["ids_routed", "d_aux"],
   attrs={**{n: REQUIRED for n in ("num_experts", "top_k")}, **_ROUTER_DEFAULTS})

op("identity_experts_grad", "The VJP of identity_experts given the choices ids: d weights[t, s] = x[t] . "
   "dy[t] for slots that picked an identity expert (ids >= ffn_experts; with dropped, also the pairs capacity "
   "dropped, ids -1), else 0; dx[t] = dy[t] * (sum of those slots' weights); fp32.",
   ["x", "dy", "ids", "weights"], ["d_weights", "dx"],
   lambda o, a: {"d_weights": TensorType("f32", o["ids"].shape), "dx": TensorType("f32", o["x"].shape)},
   attrs={"ffn_experts": REQUIRED, "dropped": False})

op("shared_gate_grad", "A sigmoid-gated shared expert's gate (scale = sigmoid(x @ w.T)): d x (fp32) and d w "
   "from the row sums of dots (d scale).",
   ["x", "w", "scale", "dots"], ["dx", "dw"],
   lambda o, a: {"dx": TensorType("f32", o["x"].shape), "dw": o["w"]})


op("attention_delta", "delta[b, h, t] = sum_d d_out * out - d_lse (fp32): the softmax backward's row term.",
   ["out", "d_out"], ["delta"], lambda o, a: {"delta": TensorType("f32", o["out"].shape[:3])},
   optional_operands=["d_lse"])
_MOBA_GRAD_IN = ["q", "k", "v", "indices", "d_out", "lse", "delta"]
op("block_sparse_attention_dq", "d q of block_sparse_attention for the forward's indices and lse.",
   _MOBA_GRAD_IN, ["d_q"], lambda o, a: {"d_q": o["q"]}, optional_operands=["cu_seqlens"],
   attrs={"block_size": REQUIRED, **KERNEL_ATTRS})
op("block_sparse_attention_dkdv", "d k, d v of block_sparse_attention for the forward's indices and lse.",
   _MOBA_GRAD_IN, ["d_k", "d_v"], lambda o, a: {"d_k": o["k"], "d_v": o["v"]}, optional_operands=["cu_seqlens"],
   attrs={"block_size": REQUIRED, **KERNEL_ATTRS})


# ---- verifier rules ------------------------------------------------------------------------------

def _dgrad_ok(n, types) -> None:
    a = n.attr
    if a["act_grad"]:
        check_activation(a["activation"])
        if a["activation"] is None:
            raise IRError("act_grad needs an activation")
        _variant_ok(a, a["glu"])
        if "gate" not in n.ins or a["glu"] != ("up" in n.ins):
            raise IRError("act_grad needs gate (and up with glu)")
        if a["scatter"] or "a2" in n.ins:
            raise IRError("act_grad goes with neither scatter nor a2")
        if a["scale_in"] and "scale" not in n.ins:
            raise IRError("scale_in needs the scale")
    elif a["glu"] or a["activation"] is not None or a["scale_in"] or {"gate", "up", "scale"} & set(n.ins):
        raise IRError("activation, glu, gate, up and scale (scale_in) belong to act_grad")
    if ("a2" in n.ins) != ("w2" in n.ins):
        raise IRError("a2 and w2 go together")
    if (a["gather_top_k"] or a["scatter"]) and "order" not in n.ins:
        raise IRError("gather/scatter needs the order operand")
    if a["num_experts"] > 1 and "offsets" not in n.ins:
        raise IRError("more than one expert needs offsets")
    w = types[n.ins["w"]]
    if w.rank != 3 or w.shape[0] != a["num_experts"] or w.shape[1] != types[n.ins["a"]].shape[1]:
        raise IRError(f"w {w} does not match {a['num_experts']} experts and a's width")


def _wgrad_ok(n, types) -> None:
    a = n.attr
    if (a["gather_a"] or a["gather_b"] or "scale" in n.ins) and "order" not in n.ins and "offsets" in n.ins:
        raise IRError("gather/scale of routed rows needs the order operand")
    if a["num_experts"] > 1 and "offsets" not in n.ins:
        raise IRError("more than one expert needs offsets")


RULES.update({"grouped_dgrad": _dgrad_ok, "grouped_wgrad": _wgrad_ok,
              "router_grad": lambda n, t: router_config(n.attr), "route_grad": lambda n, t: router_config(n.attr)})


# ---- interpreter ---------------------------------------------------------------------------------

def _segments(v, E, rows, device):
    offsets = v.get("offsets")
    if offsets is None:
        offsets = torch.tensor([0, rows], device=device)
    return [(e, int(offsets[e]), int(offsets[e + 1])) for e in range(E)]


@impl("grouped_dgrad")
def _dgrad(n, v, ctx):
    a = n.attr
    order = v.get("order")
    A = v["a"][order.long() // a["gather_top_k"]] if a["gather_top_k"] else v["a"]
    rows, cols = A.shape[0], v["w"].shape[2]
    dt = n.types[0].torch_dtype
    acc = torch.zeros(rows, cols, device=A.device)
    for e, lo, hi in _segments(v, a["num_experts"], rows, A.device):
        if hi > lo:
            acc[lo:hi] = A[lo:hi].float() @ v["w"][e].float()
            if "a2" in v:
                acc[lo:hi] += v["a2"][lo:hi].float() @ v["w2"][e].float()
    kept = int(v["offsets"][-1]) if "offsets" in v else rows
    if not a["act_grad"]:
        out = torch.zeros(rows, cols, dtype=dt, device=A.device)
        if a["scatter"]:
            out[order[:kept].long()] = acc[:kept].to(dt)
        else:
            out[:kept] = acc[:kept].to(dt)
        return {"out": out}
    pairs = order.long() if order is not None else torch.arange(rows, device=A.device)
    s = v["scale"].reshape(-1).float()[pairs] if "scale" in v else torch.ones(rows, device=A.device)
    g = v["gate"].float()
    u = v["up"].float() if a["glu"] else None
    if a["scale_in"]:       # the activation reads s g and s u
        g, u = g * s[:, None], (u * s[:, None] if u is not None else None)
    with torch.enable_grad():
        g, u = g.detach().requires_grad_(), (u.detach().requires_grad_() if u is not None else None)
        h = ref.gated(g, u, a["activation"], **glu_variant(a))
        ins = [g] + ([u] if u is not None else [])
        if a["scale_in"]:   # d s = sum_n (d(s g) gate + d(s u) up); d gate = s d(s g), d up = s d(s u)
            grads = torch.autograd.grad(h, ins, acc)
            dot = sum((d * v[r].float()).sum(1) for d, r in zip(grads, ("gate", "up")))
            grads = [d * s[:, None] for d in grads]
        else:
            grads = torch.autograd.grad(h, ins, acc * s[:, None])
            dot = (acc * h.detach()).sum(1)
    dots = torch.zeros(rows, dot_columns(cols), device=A.device)
    dots[pairs[:kept], 0] = dot[:kept]
    zero = torch.zeros(rows, cols, dtype=dt, device=A.device)
    res = {"out": zero.clone(), "out2": zero.clone(), "h": zero.clone(), "dots": dots}
    res["out"][:kept] = grads[0][:kept].to(dt)
    if u is not None:
        res["out2"][:kept] = grads[1][:kept].to(dt)
    res["h"][:kept] = h.detach()[:kept].to(dt)
    return res


@impl("grouped_wgrad")
def _wgrad(n, v, ctx):
    a = n.attr
    order = v.get("order")
    rows = order.shape[0] if order is not None else v["a"].shape[0]
    A = v["a"][order.long() // a["gather_a"]] if a["gather_a"] else v["a"]
    B = v["b"][order.long() // a["gather_b"]] if a["gather_b"] else v["b"]
    A = A.float()
    if "scale" in v:
        s = v["scale"].reshape(-1).float()
        A = A * (s[order.long()] if order is not None else s)[:, None]
    E = a["num_experts"]
    out = torch.zeros(E, A.shape[1], B.shape[1], device=A.device)
    dbias = torch.zeros(E, A.shape[1], device=A.device)
    for e, lo, hi in _segments(v, E, rows, A.device):
        out[e] = A[lo:hi].t() @ B[lo:hi].float()
        dbias[e] = A[lo:hi].sum(0)
    return {"out": out.to(n.types[0].torch_dtype), "dbias": dbias.to(n.types[0].torch_dtype)}


@impl("pair_weight_grad")
def _pair_weight_grad(n, v, ctx):
    ids = v["ids"]
    out = v["dots"].sum(1).view(ids.shape)
    if "b_down" in v:
        b = v["b_down"].float()[ids.long().clamp(min=0)]
        out = out + (v["dy"].float()[:, None, :] * b).sum(-1)
    return {"out": torch.where(ids >= 0, out, torch.zeros_like(out))}


@impl("router_grad")
def _router_grad(n, v, ctx):
    cfg = router_config(n.attr)
    noise = ctx.get("noise") if (cfg.noisy and ctx.get("training")) else None
    if cfg.noisy and ctx.get("training") and noise is None:
        raise ValueError("a noisy router in training mode needs the forward's noise tensor")
    x = v["x"].float()
    clean = ref.router_logits(x, v["w"], v.get("b"))
    noisy = x @ v["w_noise"].float().t() if noise is not None else None
    logits = clean + noise.float() * torch.nn.functional.softplus(noisy) if noise is not None else clean
    d_logits = ref.route_backward(logits, cfg, v["ids"], v["d_weights"], v.get("ids_routed"), v.get("d_aux"))
    d_clean = d_logits + v["d_logits"].float() if "d_logits" in v else d_logits
    out = {"dx": d_clean @ v["w"].float(), "dw": (d_clean.t() @ x).to(v["w"].dtype)}
    if "b" in v:
        out["db"] = d_clean.sum(0).to(v["b"].dtype)
    if "w_noise" in v:
        if noise is None:
            out["dw_noise"] = torch.zeros_like(v["w_noise"])
        else:
            d_pre = d_logits * noise.float() * torch.sigmoid(noisy)
            out["dx"] = out["dx"] + d_pre @ v["w_noise"].float()
            out["dw_noise"] = (d_pre.t() @ x).to(v["w_noise"].dtype)
    return out


@impl("expert_norm_grad")
def _expert_norm_grad(n, v, ctx):
    y, w, dy, order, offsets = v["y"].float(), v["w"].float(), v["dy"].float(), v["order"].long(), v["offsets"]
    k, eps = n.attr["top_k"], n.attr["eps"]
    E, rows = w.shape[0], y.shape[0]
    expert = ref.row_experts(offsets, rows)
    kept = expert < E
    e = expert.clamp(max=E - 1)
    pair = order[:rows]
    dn = torch.where(kept[:, None], v["weights"].reshape(-1)[pair, None].float() * dy[pair // k], 0.0)
    with torch.enable_grad():
        leaf = y.detach().requires_grad_()
        normed = torch.nn.functional.rms_norm(leaf, (y.shape[1],), eps=eps)
        (d_y,) = torch.autograd.grad(normed, leaf, dn * w[e])
    d_w = torch.zeros_like(w).index_add_(0, e[kept], (dn * normed.detach())[kept])
    d_weights = torch.zeros(v["weights"].numel(), dtype=torch.float32, device=y.device)
    d_weights[pair[kept]] = (dy[pair // k] * normed.detach() * w[e]).sum(1)[kept]
    return {"d_y": d_y.to(v["y"].dtype), "d_w": d_w, "d_weights": d_weights.view(v["weights"].shape)}


@impl("route_grad")
def _route_grad(n, v, ctx):
    return {"d_logits": ref.route_backward(v["logits"], router_config(n.attr), v["ids"], v["d_weights"],
                                           v.get("ids_routed"), v.get("d_aux"))}


def _attention_grads(n, v):
    """(d q, d k, d v) by autograd of the reference attention over the given indices."""
    with torch.enable_grad():
        leaves = [v[r].detach().float().requires_grad_() for r in ("q", "k", "v")]
        out, lse = moba_ref.moba_attention_from_indices(*leaves, v["indices"], block_size=n.attr["block_size"],
                                                        cu_seqlens=v.get("cu_seqlens"))
        d_out = v["d_out"].float()
        # d lse enters through delta = rowsum(d_out * out) - d_lse: recover it
        d_lse = (d_out * out.detach()).sum(-1) - v["delta"].float()
        loss = (out * d_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [g.to(v[r].dtype) if g is not None else torch.zeros_like(v[r]) for g, r in zip(grads, "qkv")]


@impl("attention_delta")
def _delta(n, v, ctx):
    delta = (v["d_out"].float() * v["out"].float()).sum(-1)
    return {"delta": delta - v["d_lse"].float() if "d_lse" in v else delta}


@impl("block_sparse_attention_dq")
def _attention_dq(n, v, ctx):
    return {"d_q": _attention_grads(n, v)[0]}


@impl("block_sparse_attention_dkdv")
def _attention_dkdv(n, v, ctx):
    _, dk, dv = _attention_grads(n, v)
    return {"d_k": dk, "d_v": dv}


@impl("identity_experts_grad")
def _identity_experts_grad(n, v, ctx):
    dots = (v["x"].float() * v["dy"].float()).sum(1, keepdim=True)
    share = ref.identity_share(v["ids"], v["weights"], n.attr["ffn_experts"], n.attr["dropped"])
    passed = ref.passed_slots(v["ids"], n.attr["ffn_experts"], n.attr["dropped"])
    return {"d_weights": torch.where(passed, dots, 0.0), "dx": v["dy"].float() * share}


@impl("shared_gate_grad")
def _shared_gate_grad(n, v, ctx):
    s = v["scale"].float()
    dpre = v["dots"].sum(1) * s * (1.0 - s)
    return {"dx": dpre[:, None] * v["w"].float(), "dw": (dpre[None, :] @ v["x"].float()).to(v["w"].dtype)}


assert set(ROUTER_FIELDS) <= set(_ROUTER_DEFAULTS) | {"num_experts", "top_k"}
