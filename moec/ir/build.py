"""Build the unfused IR graph of what the frontend lifted: an MoE layer from its `MoESpec`, the routed
experts alone (transformers' experts interface), or a MoBA core from its `MobaConfig`.

Each graph spells out every step the eager code performs; the passes then fuse it.

- `build_moe_graph`: router linear, route, dispatch, permute, per-projection grouped GEMMs,
  activation, combine, shared expert, cast. Graph inputs are named after `MoEWeights` fields,
  plus ``x``.
- `build_experts_graph`: the same experts given the routing (ids and weights are graph inputs).
- `build_moba_graph`: pool the key blocks, score and select blocks, attend::

    graph moba(%q: f16[B, 8, T, 64], %k: f16[B, 2, T, 64], %v: f16[B, 2, T, 64]) {
      %pooled: f16[B, 2, ceiling(T/64), 64] = block_pool(k=%k) {block_size=64}
      %indices: i32[B, 8, T, 4] = block_gate(q=%q, pooled=%pooled) {block_size=64, top_k=4}
      %out: f16[B, 8, T, 64] = block_sparse_attention(q=%q, k=%k, v=%v, indices=%indices) {block_size=64}
      return %out
    }

  Inputs ``q``, ``k``, ``v`` are in ``[B, heads, T, D]`` layout (callers pass strided views of
  other layouts).
"""
from __future__ import annotations

from ..moba.config import MobaConfig
from ..spec import MoESpec, MoEWeights
from .graph import Builder, Graph
from .ops import router_attrs
from .types import B, S, T, TensorType, dtype_name

OUTPUTS = ("y", "logits", "aux", "weights")


# `MoEWeights` fields the graph takes as one-expert stacks: the shared expert's [n, k] matrices as [1, n, k]
ONE_EXPERT = ("shared_up", "shared_gate", "shared_down")


def graph_input(field: str, t):
    """The graph input for `MoEWeights` field ``field`` holding ``t`` (a view: a one-expert stack for
    `ONE_EXPERT` fields, else ``t``)."""
    return t.unsqueeze(0) if field in ONE_EXPERT else t


def moe_inputs(x, w: MoEWeights, logits=None, choices=None) -> dict:
    """The inputs of `build_moe_graph`'s graph (named after `MoEWeights` fields) for one call: the
    selection bias in fp32, the shared expert's matrices as one-expert stacks (views); ``logits``: an
    external router's fp32 logits of ``x`` (`MoESpec.external_router`); ``choices``: a token table's rows
    for the call's tokens (`RouterConfig.token_table`)."""
    named = {"x": x, "logits": logits, "choices": choices, "w_router": w.w_router, "b_router": w.b_router,
             "w_noise": w.w_noise,
             "w_gate": w.w_gate, "w_up": w.w_up, "w_down": w.w_down,
             "score_bias": w.score_bias.float() if w.score_bias is not None else None,
             "shared_up": w.shared_up, "shared_gate": w.shared_gate, "shared_down": w.shared_down,
             "shared_gate_proj": w.shared_gate_proj, "b_gate": w.b_gate, "b_up": w.b_up, "b_down": w.b_down,
             "w_expert_norm": w.w_expert_norm.float() if w.w_expert_norm is not None else None}
    return {k: graph_input(k, v) for k, v in named.items() if v is not None}


def expert_inputs(b: Builder, E: int, d: int, f: int, dt: str, glu: bool, bias: bool, norm: bool = False) -> dict:
    """Declare the routed experts' weight inputs (named after `MoEWeights` fields); role -> value (``norm``: the
    expert norms' fp32 weights too)."""
    ws = {"w_gate": b.input("w_gate", TensorType(dt, (E, f, d))) if glu else None,
          "w_up": b.input("w_up", TensorType(dt, (E, f, d))),
          "w_down": b.input("w_down", TensorType(dt, (E, d, f)))}
    if bias:
        ws.update(b_gate=b.input("b_gate", TensorType(dt, (E, f))) if glu else None,
                  b_up=b.input("b_up", TensorType(dt, (E, f))), b_down=b.input("b_down", TensorType(dt, (E, d))))
    if norm:
        ws["w_expert_norm"] = b.input("w_expert_norm", TensorType("f32", (E, d)))
    return ws


def routed_experts(b: Builder, x: str, ids: str, weights: str, ws: dict, E: int, k: int, activation: str,
                   glu: bool, variant: dict, input_scaled: bool = False, norm_eps=None) -> str:
    """Dispatch, permute, the gate/up/down grouped GEMMs, the activation and the weighted combine, unfused
    (``ws`` from `expert_inputs`); returns the fp32 ``[T, d]`` combined output. ``input_scaled``: the weights
    scale the permuted rows (each expert's input) and the combine is a plain sum. ``norm_eps``: each expert's
    output rows are RMS-normalised by its own norm weight before the combine (`MoESpec.expert_norm`)."""
    disp = b.add("dispatch", {"ids": ids}, {"num_experts": E})
    xs = b.add("permute", {"x": x, "order": disp["order"], "scale": weights if input_scaled else None},
               {"top_k": k}, names={"out": "xs"})["out"]
    proj = {"num_experts": E}
    up = b.add("grouped_gemm", {"a": xs, "w": ws["w_up"], "offsets": disp["offsets"], "bias": ws.get("b_up")},
               proj, names={"out": "up"})["out"]
    gate = (b.add("grouped_gemm", {"a": xs, "w": ws["w_gate"], "offsets": disp["offsets"],
                                   "bias": ws.get("b_gate")}, proj, names={"out": "gate"})["out"] if glu else None)
    h = b.add("activate", {"gate": gate or up, "up": up if glu else None},
              {"activation": activation, "glu": glu, **variant}, names={"out": "h"})["out"]
    ys = b.add("grouped_gemm", {"a": h, "w": ws["w_down"], "offsets": disp["offsets"], "bias": ws.get("b_down")},
               proj, names={"out": "ys"})["out"]
    if norm_eps is not None:
        ys = b.add("expert_norm", {"y": ys, "w": ws["w_expert_norm"], "offsets": disp["offsets"]}, {"eps": norm_eps},
                   names={"out": "ys_normed"})["out"]
    return b.add("combine", {"y": ys, "order": disp["order"], "weights": None if input_scaled else weights,
                             "ids": ids}, {"top_k": k}, names={"out": "routed"})["out"]


def build_experts_graph(E: int, k: int, d: int, f: int, activation: str, glu: bool, dtype,
                        bias: bool = False, variant: tuple = ()) -> Graph:
    """The routed experts of an MoE layer, given the routing: ``y[t] = sum_s weights[t, s] *
    expert_{ids[t, s]}(x[t])``; graph inputs ``x, ids, weights, [w_gate,] w_up, w_down`` (and
    ``[b_gate,] b_up, b_down`` with ``bias``); ``variant``: the GLU variant's non-default items."""
    dt = dtype_name(dtype)
    b = Builder("hf_experts")
    x = b.input("x", TensorType(dt, (T, d)))
    ids = b.input("ids", TensorType("i32", (T, k)))
    weights = b.input("weights", TensorType("f32", (T, k)))
    ws = expert_inputs(b, E, d, f, dt, glu, bias)
    y = routed_experts(b, x, ids, weights, ws, E, k, activation, glu, dict(variant))
    y = b.add("cast", {"x": y}, {"dtype": dt}, names={"out": "y"})["out"]
    return b.graph([y])


def build_moe_graph(spec: MoESpec, dtype, outputs=("y",), name: str = "moe") -> Graph:
    """The layer on ``x: dtype[T, hidden]``; ``outputs`` picks from ``y``, ``logits`` (fp32 router logits),
    ``aux`` (the load-balancing loss), ``weights`` (fp32 routing weights ``[T, k]``, after capacity)."""
    for o in outputs:
        if o not in OUTPUTS:
            raise ValueError(f"unknown output {o!r}; choose from {OUTPUTS}")
    if "aux" in outputs and not spec.router.aux_loss:
        raise ValueError("the aux output needs a router with aux_loss=True")
    if "logits" in outputs and spec.external_router:
        raise ValueError("an external router's logits are its own output, not the program's")
    dt = dtype_name(dtype)
    r = spec.router
    E, k, d, f = r.num_experts, r.top_k, spec.hidden, spec.ffn
    Ef = spec.ffn_experts                   # experts with an MLP (the router's first choices)
    b = Builder(name)
    x = b.input("x", TensorType(dt, (T, d)))
    if spec.external_router:            # the logits of a router moec leaves to PyTorch are an input
        logits = b.input("logits", TensorType("f32", (T, E)))
    else:
        w_router = b.input("w_router", TensorType(dt, (E, d)))
        b_router = b.input("b_router", TensorType(dt, (E,))) if r.router_bias else None
    score_bias = b.input("score_bias", TensorType("f32", (E,))) if r.score_bias else None
    w_noise = b.input("w_noise", TensorType(dt, (E, d))) if r.noisy else None
    # a token table's choices: each token's row, looked up by PyTorch as the forward looks it up
    choices = b.input("choices", TensorType("i64", (T, k))) if r.token_table else None
    ws = expert_inputs(b, Ef, d, f, dt, spec.glu, spec.expert_bias, spec.expert_norm is not None)

    if not spec.external_router:
        logits = b.add("linear", {"x": x, "w": w_router, "b": b_router}, names={"out": "logits"})["out"]
    noise = b.add("linear", {"x": x, "w": w_noise}, names={"out": "noise_logits"})["out"] if r.noisy else None
    route = b.add("route", {"logits": logits, "score_bias": score_bias, "noise_logits": noise, "choices": choices},
                  router_attrs(r), results=["ids", "weights"] + (["aux"] if r.aux_loss else []))
    ids, extra = route["ids"], None
    passing = r.dropped == "pass"       # pairs capacity dropped pass their token through, weighted
    if spec.identity_experts or passing:  # picks of identity experts add weight * x and run no MLP
        ident = b.add("identity_experts", {"x": x, "ids": ids, "weights": route["weights"]},
                      {"ffn_experts": Ef, "dropped": passing}, names={"ids": "ids_ffn", "out": "identity_out"})
        ids, extra = ident["ids"], ident["out"]
    y = routed_experts(b, x, ids, route["weights"], ws, Ef, k, spec.activation, spec.glu, spec.glu_variant,
                       spec.input_scaled, spec.expert_norm)

    if spec.shared is not None:
        fs = spec.shared.width
        s_up = b.input("shared_up", TensorType(dt, (1, fs, d)))
        s_gate = b.input("shared_gate", TensorType(dt, (1, fs, d))) if spec.glu else None
        s_down = b.input("shared_down", TensorType(dt, (1, d, fs)))
        scale = None
        if spec.shared.gated:
            w_sg = b.input("shared_gate_proj", TensorType(dt, (1, d)))
            scale = b.add("shared_gate", {"x": x, "w": w_sg}, names={"scale": "shared_scale"})["scale"]
        one = {"num_experts": 1}
        sh = b.add("grouped_gemm", {"a": x, "w": s_gate or s_up, "w_up": s_up if spec.glu else None},
                   {**one, "activation": spec.activation, "glu": spec.glu, **spec.shared_variant},
                   names={"out": "shared_h"})["out"]
        so = b.add("grouped_gemm", {"a": sh, "w": s_down, "scale": scale}, {**one, "out_dtype": "f32"},
                   names={"out": "shared_out"})["out"]
        extra = so if extra is None else b.add("add", {"a": extra, "b": so}, names={"out": "identity_shared"})["out"]
    if extra is not None:               # one add after the routed experts (fold-combine absorbs it)
        name = "routed_shared" if spec.shared else "routed_identity"
        y = b.add("add", {"a": y, "b": extra}, names={"out": name})["out"]

    out = {"y": b.add("cast", {"x": y}, {"dtype": dt}, names={"out": "y"})["out"],
           "logits": logits, "aux": route.get("aux"), "weights": route["weights"]}
    return b.graph([out[o] for o in outputs])


MOBA_OUTPUTS = ("out", "lse", "indices")


def build_moba_graph(cfg: MobaConfig, dtype, *, varlen: bool = False, kconv: int = 0, scheme: str = "auto",
                     outputs=("out",), name: str = "moba") -> Graph:
    """The core on ``q: dtype[B, H, T, D]``, ``k``/``v: dtype[B, Hkv, T, D]``; ``varlen`` adds the input
    ``cu_seqlens: i32[S + 1]`` (packed sequences), ``kconv`` (its width kc) the key convolution's
    ``kconv_weight [Hkv, D, kc]``; ``scheme`` is the attention's; ``outputs`` picks from ``out``, ``lse``
    (fp32 log-sum-exp) and ``indices`` (the selected blocks)."""
    for o in outputs:
        if o not in MOBA_OUTPUTS:
            raise ValueError(f"unknown output {o!r}; choose from {MOBA_OUTPUTS}")
    dt = dtype_name(dtype)
    b = Builder(name)
    q = b.input("q", TensorType(dt, (B, cfg.heads, T, cfg.head_dim)))
    k = b.input("k", TensorType(dt, (B, cfg.kv_heads, T, cfg.head_dim)))
    v = b.input("v", TensorType(dt, (B, cfg.kv_heads, T, cfg.head_dim)))
    cu = b.input("cu_seqlens", TensorType("i32", (S + 1,))) if varlen else None
    w = b.input("kconv_weight", TensorType(dt, (cfg.kv_heads, cfg.head_dim, kconv))) if kconv else None
    bs = {"block_size": cfg.block_size}
    pooled = b.add("block_pool", {"k": k, "cu_seqlens": cu, "kconv_weight": w}, bs)["pooled"]
    idx = b.add("block_gate", {"q": q, "pooled": pooled, "cu_seqlens": cu}, {**bs, "top_k": cfg.top_k})["indices"]
    att = b.add("block_sparse_attention", {"q": q, "k": k, "v": v, "indices": idx, "cu_seqlens": cu},
                {**bs, **({"scheme": scheme} if scheme != "auto" else {})},
                results=["out", "lse"] if "lse" in outputs else ["out"])
    return b.graph([{"out": att["out"], "lse": att.get("lse"), "indices": idx}[o] for o in outputs])
