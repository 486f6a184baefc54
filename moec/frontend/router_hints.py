"""Router hints: what the partial fx graph of an MoE forward (`moec.frontend.trace.trace_partial`)
says about its router: a pattern -> proposal reader over `moec.frontend.fx_ops`.

`read_router` starts at the router's linear/matmul and follows its users up to the selection
(top-k or argmax): which score function, whether top-k comes before it, a sum-then-divide
(renormalise), a multiplication by a float constant (scaling), a 3-D view into groups, an added
[E] tensor (selection bias), a randn (noise), top-k's k. The hints are proposals:
`moec.frontend.candidates` enumerates what they leave open and the probe decides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from .fx_ops import ACTIVATION_OPS, MATMULS, MAXES, RESHAPES, ancestors, descendants, int_arg, source
from .trace import Traced


@dataclass
class RouterHints:
    """What the partial graph says about the router; every field may be unknown (None/empty)."""

    found: bool = False
    score: Optional[str] = None
    order: Optional[str] = None
    renormalize: Optional[bool] = None
    scaling: Optional[float] = None
    top_k: list = field(default_factory=list)
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    group_score: Optional[str] = None
    score_bias: Optional[str] = None
    noisy: bool = False
    softplus: bool = False              # the layer computes a softplus (a sqrt(softplus) score, or noise)
    activations: list = field(default_factory=list)
    chain: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.found:
            return "router not found in the traced graph"
        return "traced router path: " + " -> ".join(self.chain)


def _router_nodes(cap: Traced, module_paths: set, param_paths: set) -> list:
    out = []
    for n in cap.graph.nodes:
        if n.op == "call_module" and n.target in module_paths:
            out.append(n)
        elif cap.kind(n) in MATMULS | {"linear"}:
            for a in n.all_input_nodes:
                o = source(a)
                if isinstance(o, fx.Node) and o.op == "get_attr" and o.target in param_paths:
                    out.append(n)
                    break
    return out


def _group_view(cap: Traced, nodes, E: int):
    """A view/reshape into ``[T, G, E // G]`` with 1 < G < E: (node, G)."""
    for n in nodes:
        if cap.kind(n) not in RESHAPES:
            continue
        shape = list(n.args[1:]) if n.op == "call_method" else list(n.args[1]) if len(n.args) > 1 else []
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        if len(shape) != 3:
            continue
        g, per = shape[1], shape[2]
        if isinstance(g, int) and 1 < g < E and E % g == 0 and per in (-1, E // g):
            return n, g
    return None, None


def _constant_floats(node: fx.Node):
    return [a for a in node.args if isinstance(a, float) and not isinstance(a, bool)]


def read_router(cap: Traced, E: int, module_paths: set, param_paths: set,
                tensor_shapes: dict) -> RouterHints:
    """Read `RouterHints` off the (partial) graph; ``tensor_shapes`` maps attribute paths to shapes."""
    h = RouterHints()
    acts = []
    for n in cap.graph.nodes:
        k = cap.kind(n)
        if k in ACTIVATION_OPS and k not in acts:
            acts.append(k)
        if k == "randn":
            h.noisy = True
    h.activations = acts
    h.softplus = any(cap.kind(n) == "softplus" for n in cap.graph.nodes)
    h.noisy = h.noisy and h.softplus
    starts = _router_nodes(cap, module_paths, param_paths)
    if not starts:
        return h
    h.found = True
    order = {n: i for i, n in enumerate(cap.graph.nodes)}
    clos = sorted(descendants(starts), key=order.__getitem__)
    kinds = {n: cap.kind(n) for n in clos}
    scores = [n for n in clos if kinds[n] in ("softmax", "sigmoid")]
    topks = [n for n in clos if kinds[n] == "topk"]
    gview, G = _group_view(cap, clos, E)
    final = topks[-1] if topks else None
    argmaxes = [n for n in clos if kinds[n] in MAXES | {"argmax"} and (gview is None or gview not in n.all_input_nodes)]
    if gview is not None:
        h.n_group = G
        grouped = descendants([gview])
        for t in topks:
            if t is final or t not in grouped:
                continue
            kk = int_arg(t, 1, "k")
            if t.args and t.args[0] is gview and kk == 2:
                h.group_score = "top2_sum"
            elif kk is not None:
                h.topk_group = kk
        if any(kinds[n] in MAXES and n.args and n.args[0] is gview for n in clos):
            h.group_score = h.group_score or "max"
    if final is not None:
        kk = int_arg(final, 1, "k")
        # top-(k+1) followed by a slice [:, :k] (Shazeer): the slice is the real k
        for g in final.users:
            for s in g.users:
                if cap.kind(s) == "getitem" and isinstance(s.args[1], tuple):
                    sl = s.args[1][-1]
                    if isinstance(sl, slice) and sl.start in (None, 0) and isinstance(sl.stop, int):
                        h.top_k.append(sl.stop)
        if kk is not None:
            h.top_k.append(kk)
    elif argmaxes:
        h.top_k.append(1)
    sel = final if final is not None else (argmaxes[0] if argmaxes else None)
    if not scores and not h.noisy and any(kinds[n] == "softplus" for n in clos):
        h.score = "sqrtsoftplus"        # the only score of a softplus of the logits (DeepSeek-V4)
    if scores:
        s0 = scores[0]
        h.score = kinds[s0]
        if sel is not None:
            if s0 in ancestors(sel):
                h.order = "score_then_topk"
            elif sel in ancestors(s0):
                h.order = "topk_then_score"
    if sel is not None:
        after = [n for n in descendants([sel]) if n is not sel]
        after_set = set(after)
        h.renormalize = False
        for n in after:
            if kinds.get(n, cap.kind(n)) == "div" and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
                if any(cap.kind(a) == "sum" and a in after_set for a in ancestors(n.args[1])):
                    h.renormalize = True
            if cap.kind(n) == "mul":
                consts = [c for c in _constant_floats(n) if c not in (0.0, 1.0)]
                if consts and h.scaling is None:
                    h.scaling = consts[0]
        before = ancestors(sel)
        for n in clos:
            if n in before and kinds[n] == "add":
                for a in n.args:
                    o = source(a)
                    if isinstance(o, fx.Node) and o.op == "get_attr" and tuple(tensor_shapes.get(o.target, ())) == (E,):
                        h.score_bias = o.target
    chain = []
    for n in clos:
        k = kinds[n]
        if k in ("softmax", "sigmoid", "topk", "argmax", "add", "randn", "softplus") or n in starts:
            label = "router" if n in starts else k
            if k == "topk":
                label = f"topk({int_arg(n, 1, 'k')})"
            if k == "add":
                attrs = [source(a) for a in n.args if isinstance(source(a), fx.Node) and source(a).op == "get_attr"]
                if not attrs:
                    continue
                label = f"+ {attrs[0].target}"
            if not chain or chain[-1] != label:
                chain.append(label)
        if n is sel:
            break
    if h.renormalize:
        chain.append("renormalise")
    if h.scaling is not None:
        chain.append(f"x{h.scaling:g}")
    h.chain = chain
    return h
