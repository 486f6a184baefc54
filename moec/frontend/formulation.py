"""What the traced forward of an MoE layer does with its experts (`moec.frontend.trace.trace_partial`'s graph):
how it reaches them (the formulation explain() names: a loop over expert modules, a gather of stacked weights
by the routed ids, or every expert on every token) and whether the routing weights scale what the experts read
(input-scaled experts, `MoESpec.input_scaled`: the candidates then scale the experts' input).
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .fx_ops import CASTS, MATMULS, RESHAPES, descendants, strip
from .structure import Structure
from .trace import Traced


def stacked_usage(cap: Traced, names: set) -> Optional[str]:
    """How the traced forward reads stacked expert weights: 'gather' (indexed by routed ids),
    'dense' (whole weight in an einsum/matmul), or None (not reached by the trace)."""
    for n in cap.graph.nodes:
        if n.op == "get_attr" and n.target in names:
            for u in n.users:
                k = cap.kind(u)
                if k == "getitem" and isinstance(u.args[1], fx.Node):
                    return "gather"
                if k in MATMULS | {"linear"}:
                    return "dense"
    return None


def module_calls_depend_on(cap: Traced, targets: set, starts_paths: set) -> Optional[bool]:
    """Whether calls to the modules ``targets`` (experts) take inputs derived from the router
    output (None: no such call was traced)."""
    router = [n for n in cap.graph.nodes if n.op == "call_module" and n.target in starts_paths]
    calls = [n for n in cap.graph.nodes if n.op == "call_module" and n.target in targets]
    if not calls or not router:
        return None
    down = descendants(router)
    return any(any(a in down for a in c.all_input_nodes) for c in calls)


def scaled_expert_input(cap: Traced, st: Structure, router_paths: set) -> Optional[str]:
    """The node where the traced forward multiplies what the experts read by a value computed from the router
    (the routing weights scaling the experts' input, as Llama4 does), right before an expert module call or a
    matmul with a stacked expert weight; None when it does not (or the trace did not reach the experts)."""
    router = [n for n in cap.graph.nodes if n.op in ("call_module", "get_attr") and n.target in router_paths]
    if not router:
        return None
    routed = descendants(router) | set(router)
    stacked, experts = {p for p, _ in st.stacked}, set(st.expert_paths)
    weight = lambda a: a.op == "get_attr" and a.target in stacked          # noqa: E731
    layout = RESHAPES | CASTS | {"transpose", "permute", "repeat", "expand", "unsqueeze", "flatten",
                                 "repeat_interleave", "gather", "index_select", "getitem"}

    def the_input(o) -> bool:            # the layer's input, through layout ops and row gathers only
        o = strip(o, layout, cap.root)
        return isinstance(o, fx.Node) and o.op == "placeholder"
    for n in cap.graph.nodes:
        if n.op == "call_module" and n.target in experts:
            inputs = list(n.all_input_nodes)
        elif cap.kind(n) in MATMULS and any(weight(a) for a in n.all_input_nodes):
            inputs = [a for a in n.all_input_nodes if not weight(a)]
        else:
            continue
        for a in inputs:
            a = strip(a, RESHAPES | CASTS | {"transpose", "permute"}, cap.root)
            if isinstance(a, fx.Node) and cap.kind(a) in ("mul", "mul_") and \
                    any(o in routed for o in a.all_input_nodes) and any(the_input(o) for o in a.all_input_nodes):
                return a.name
    return None


def scaled_input_reason(node: Optional[str]) -> str:
    """The input-scaling clause of a reason for `scaled_expert_input`'s node, or "" (None)."""
    return (f"the routing weights scale the experts' input ({node}: the experts see weight * x, as Llama4's do); "
            if node else "")


def read_formulation(st: Structure, cap: Traced, router_paths: set) -> tuple:
    """``(name, how)``: the formulation explain() names for the traced forward (from how it reaches the experts)."""
    if st.experts is not None:
        dep = module_calls_depend_on(cap, set(st.expert_paths), router_paths)
        if dep is False:
            return "dense one-hot", "every expert runs on every token (expert inputs do not depend on routing)"
        return "module-list loop", f"each module of {st.experts} called on its routed tokens"
    usage = stacked_usage(cap, {p for p, _ in st.stacked})
    if usage == "dense":
        return "dense one-hot", "stacked weights used whole in einsum/matmul over all tokens"
    if usage == "gather":
        return "stacked 3-D weights, gather + bmm", "expert weights gathered per (token, slot) by routed ids"
    return "stacked 3-D weights, loop over experts", "expert weights sliced per expert in a data-dependent loop"
