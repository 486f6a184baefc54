"""The verifier: structural rules for every node, then per-op rules from a table.

`verify(graph)` raises `IRError` naming the node and the broken rule. Run after every pass.
"""
from __future__ import annotations

import networkx as nx

from ..spec import GLU_PLAIN, MoESpecError, check_glu_variant
from .graph import Graph, Node
from .ops import OPS, REQUIRED, IRError, check_activation, glu_variant, router_config
from .types import TensorType, condition


def _router_ok(n: Node, types) -> None:
    cfg = router_config(n.attr)
    if n.op == "fused_route" and cfg.order == "topk_then_score":
        raise IRError("fused_route needs order='score_then_topk' or 'logits_then_score' (canonicalise first)")
    if n.op == "fused_route" and cfg.has_capacity:
        raise IRError("fused_route does not apply capacity; add an apply_capacity node")
    if cfg.score_bias != ("score_bias" in n.ins):
        raise IRError("score_bias attribute and score_bias operand disagree")
    if cfg.token_table != ("choices" in n.ins):
        raise IRError("token_table attribute and choices operand disagree")
    if "choices" in n.ins:
        t = types[n.ins["choices"]]
        if t.dtype not in ("i32", "i64") or t.rank != 2 or t.shape[1] != cfg.top_k:
            raise IRError(f"choices must be int[T, top_k={cfg.top_k}], got {t.dtype}{list(t.shape)}")
    if n.op == "fused_route":
        given = "logits" in n.ins
        if given == ("x" in n.ins) or ("x" in n.ins) != ("w" in n.ins):
            raise IRError("fused_route reads x and w (its gate GEMM) or the given logits, one of the two")
        if given and any(r in n.ins for r in ("b", "w_noise", "w_shared_gate")):
            raise IRError("fused_route on given logits has no router bias, noise or shared-expert gate to compute")
        if cfg.router_bias != ("b" in n.ins):
            raise IRError("router_bias attribute and operand b disagree")
        if cfg.noisy != ("w_noise" in n.ins):
            raise IRError("noisy attribute and w_noise operand disagree")
        if cfg.aux_loss != ("prob_sum" in n.outs):
            raise IRError("aux_loss attribute and prob_sum result disagree")
        if ("w_shared_gate" in n.ins) != ("shared_scale" in n.outs):
            raise IRError("w_shared_gate operand and shared_scale result go together")
    if n.op == "route":
        if cfg.noisy != ("noise_logits" in n.ins):
            raise IRError("noisy attribute and noise_logits operand disagree")
        if cfg.aux_loss != ("aux" in n.outs):
            raise IRError("aux_loss attribute and aux result disagree")


def _variant_ok(a: dict, glu: bool) -> None:
    try:
        check_glu_variant(a["activation"] or "silu", glu, **glu_variant(a))
    except MoESpecError as e:
        raise IRError(str(e)) from None


def _gemm_ok(n: Node, types) -> None:
    a = n.attr
    check_activation(a["activation"])
    if a["activation"] is None and glu_variant(a) != GLU_PLAIN:
        raise IRError("a GLU variant needs an activation")
    _variant_ok(a, a["glu"])
    if "bias_up" in n.ins and not a["glu"]:
        raise IRError("bias_up given without glu")
    for role, of in (("bias", "w"), ("bias_up", "w_up")):
        if role in n.ins:
            b, w = types[n.ins[role]], types[n.ins[of]]
            if b.rank != 2 or b.shape != (w.shape[0], w.shape[1]):
                raise IRError(f"{role} {b} must be [experts, out features] of {of} {w}")
    if a["glu"] and ("w_up" not in n.ins or a["activation"] is None):
        raise IRError("glu needs a w_up operand and an activation")
    if "w_up" in n.ins and not a["glu"]:
        raise IRError("w_up given without glu")
    if "pre" in n.outs and a["activation"] is None or "pre_up" in n.outs and not a["glu"]:
        raise IRError("pre needs an activation and pre_up a glu: they are the activation's inputs")
    if "pre_up" in n.outs and "pre" not in n.outs:
        raise IRError("pre_up without pre")
    if (a["gather_top_k"] or a["scatter"]) and "order" not in n.ins:
        raise IRError("gather/scatter needs the order operand")
    if a["scale_in"] and ("scale" not in n.ins or "pre" in n.outs):
        raise IRError("scale_in needs a scale (the rows' weights) and stores no pre (they would be scaled)")
    if a["num_experts"] > 1 and "offsets" not in n.ins:
        raise IRError("more than one expert needs offsets")
    w = types[n.ins["w"]]
    if w.rank != 3 or w.shape[0] != a["num_experts"] or w.shape[2] != types[n.ins["a"]].shape[1]:
        raise IRError(f"w {w} does not match {a['num_experts']} experts and a's width")


def _activate_ok(n: Node, types) -> None:
    check_activation(n.attr["activation"])
    _variant_ok(n.attr, n.attr["glu"])
    if n.attr["glu"] != ("up" in n.ins):
        raise IRError("glu and the up operand go together")


def _select_ok(n: Node, types) -> None:
    if types[n.ins["a"]] != types[n.ins["b"]]:
        raise IRError(f"a {types[n.ins['a']]} and b {types[n.ins['b']]} must have one type")
    try:
        condition(n.attr["when"])
    except (ValueError, TypeError, SyntaxError) as e:
        raise IRError(f"when: {e}") from None


def _expert_norm_ok(n: Node, types) -> None:
    if not n.attr["scatter"] == ("order" in n.ins) == ("weights" in n.ins):
        raise IRError("expert_norm scatters (the combine folded in) exactly when it reads order and weights")
    if not n.attr["eps"] > 0:
        raise IRError(f"expert_norm's eps must be positive, got {n.attr['eps']}")


RULES = {"route": _router_ok, "fused_route": _router_ok, "apply_capacity": lambda n, t: router_config(n.attr),
         "grouped_gemm": _gemm_ok, "activate": _activate_ok, "select": _select_ok, "expert_norm": _expert_norm_ok}


def verify(g: Graph) -> Graph:
    types: dict[str, TensorType] = {}
    for name, t in g.inputs:
        if name in types:
            raise IRError(f"input %{name} defined twice")
        types[name] = t
    for i, n in enumerate(g.nodes):
        where = f"node {i} ({n.op} %{n.name if n.results else '?'})"
        if n.op not in OPS:
            raise IRError(f"{where}: unknown op")
        opdef = OPS[n.op]
        try:
            for role in opdef.operands:
                if role not in n.ins:
                    raise IRError(f"missing operand {role!r}")
            for role, v in n.operands:
                if role not in opdef.all_operands:
                    raise IRError(f"unknown operand role {role!r}")
                if v not in types:
                    raise IRError(f"operand %{v} is not defined before use")
            for k, default in opdef.attrs.items():
                if default is REQUIRED and k not in dict(n.attrs):
                    raise IRError(f"missing attribute {k!r}")
            for k, _ in n.attrs:
                if k not in opdef.attrs:
                    raise IRError(f"unknown attribute {k!r}")
            for role in opdef.results:
                if role not in opdef.optional_results and role not in n.outs:
                    raise IRError(f"missing result {role!r}")
            if n.op in RULES:
                RULES[n.op](n, types)
            inferred = opdef.infer({r: types[v] for r, v in n.operands}, n.attr)
            for (role, v), t in zip(n.results, n.types):
                if v in types:
                    raise IRError(f"value %{v} defined twice")
                if inferred[role] != t:
                    raise IRError(f"result %{v} has type {t}, inferred {inferred[role]}")
                types[v] = t
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
        except (MoESpecError, KeyError, TypeError, IndexError) as e:
            raise IRError(f"{where}: {type(e).__name__}: {e}") from None
    for v in g.outputs:
        if v not in types:
            raise IRError(f"output %{v} is not defined")
    if not nx.is_directed_acyclic_graph(g.nx()):
        raise IRError("graph has a cycle")
    return g
