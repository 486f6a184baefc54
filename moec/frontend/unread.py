"""Why a module with experts is not read, in words: the first feature it lacks (explain()'s EAGER lines).

`experts_without_router` speaks of a module that holds experts but is no `discover` candidate (a router
network moec does not call, a router scoring other choices, product-key retrieval experts), and
`unsupported_parts` of a candidate no configuration reproduced (norms, expert activations of its own).
"""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

from .adapters import known_activation
from .structure import (_EXPERT_NAMES, _ROUTER_NAMES, Structure, _depth, _expert_containers, _is_norm, _roots,
                        _score, _stacked_params)


def experts_without_router(module: nn.Module) -> Optional[str]:
    """Why ``module``, which holds experts (a container or 3-D weights named *expert*, not *shared*)
    but is no `discover` candidate, is not an MoE layer moec reads, in words; None when it holds none."""
    keyed = _product_key_experts(module)
    if keyed:
        return keyed
    routed = lambda p: _score(p, _EXPERT_NAMES) and "shared" not in p.lower()  # noqa: E731
    containers = [c for c in _expert_containers(module) if routed(c[0])]
    if containers:
        name, paths, cls = containers[0]
        E, what, inside = len(paths), f"{name} ({len(paths)} x {cls})", name + "."
        dims = {n for p in paths[:1] for t in module.get_submodule(p).parameters() for n in t.shape}
    else:
        E, params = _stacked_params(module, routed)
        if not params:
            return None
        what, inside = ", ".join(p for p, _ in params), None
        dims = {n for _, shape in params for n in shape[1:]}
    weights = [(p, tuple(t.shape)) for p, t in module.named_parameters()
               if t.dim() == 2 and not (inside and p.startswith(inside)) and not routed(p.split(".")[0])]
    weights.sort(key=lambda w: -_score(w[0], _ROUTER_NAMES))
    near = [f"{p} {list(shape)}" for p, shape in weights
            if E not in shape and any(n in dims for n in shape) and any(n > E and n not in dims for n in shape)]
    deep = [p for p, shape in weights if E in shape and _depth(p) > 1]
    head = f"it holds {E} experts ({what})"
    top = weights[0][0].split(".")[0] if weights and "." in weights[0][0] else None
    in_top = [p for p, _ in weights if top and p.startswith(top + ".")]
    if top and _score(top, _ROUTER_NAMES) and len(in_top) > 1:
        return (f"{head}, but its router {top} ({type(getattr(module, top)).__name__}) is a small network of "
                f"{len(in_top)} weights, not one linear, and no linear of it has {E} outputs: moec calls a router "
                f"network of its own (an external router) only when one of its linears reads the hidden states "
                f"and one gives the {E} logits")
    if near:
        return (f"{head}, but its router's weight {near[0]} scores a different number of choices: routers "
                f"that also score shared experts are not supported (extra choices are read as identity experts "
                f"only from an nn.Linear router named like one: gate, router, ...)")
    if deep:
        return (f"{head}, and the weight {deep[0]} with {E} outputs is nested more than one level down "
                f"(an MLP router, or a router inside a wrapper, is not read)")
    listed = ", ".join(f"{p} {list(shape)}" for p, shape in weights[:3]) or "none"
    return f"{head}, but no router weight with {E} outputs was found (2-D weights: {listed})"


def _product_key_experts(module: nn.Module) -> Optional[str]:
    """Why a layer of product-key retrieval experts (rank-one experts kept as rows of embedding tables, picked
    through two sets of sqrt(E) keys: PEER, Doge's CDMoE) is not read, in words; None for other modules."""
    if any(len(list(c.children())) for c in module.children()):
        return None                     # a model or a block holding layers, not one layer
    tables = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Embedding)]
    sizes = {m.num_embeddings for _, m in tables}
    for E in sizes:
        keys = math.isqrt(E)
        rows = [n for n, m in tables if m.num_embeddings == E]
        gate = next((n for n, m in module.named_children() if isinstance(m, nn.Linear) and m.out_features == 2 * keys
                     and all(t.embedding_dim == m.in_features for n2, t in tables if n2 in rows)), None)
        if len(rows) >= 2 and keys >= 2 and keys * keys == E and gate is not None:
            return (f"it holds {E} rank-one experts as rows of the embedding tables {', '.join(rows)}, picked by "
                    f"product keys ({gate} scores two sets of {keys} keys): product-key retrieval experts are not "
                    f"supported")
    return None


def product_key_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer of product-key retrieval experts (`_product_key_experts`)."""
    return _product_key_experts(module) is not None


def unsupported_parts(module: nn.Module, st: Structure) -> str:
    """What the layer holds that moec does not compute, in words (``"it applies ..., which moec does not
    support; "``), else ``""``: normalisation modules (expert norms other than one ``[E, d]`` scale tensor, a
    norm elsewhere than on the combined output: that one moec runs after its kernels; a shared expert's own
    norm is no obstacle, the shared expert runs as its module) and expert activations none of moec's is (an
    activation module's output, evaluated)."""
    found = {}
    expert_roots, shared_roots = _roots(st)
    read = tuple(p.rsplit(".", 1)[0] for p, _ in st.expert_norms if "." in p)   # the norms read as [E, d] scales
    for path, m in module.named_modules():
        top = path.split(".")[0]
        if path and _is_norm(m) and path not in read and not (top in shared_roots or "shared" in top):
            kind = ("expert norms other than one [E, d] scale tensor" if top in expert_roots
                    else "a norm outside the experts that the forward does not apply to the combined output alone")
            found.setdefault(kind, []).append(path)
        act = getattr(m, "act_fn", None)
        if top in expert_roots | shared_roots and isinstance(act, nn.Module) and not known_activation(act):
            found.setdefault(f"an expert activation of its own, {type(act).__name__}", []).append(
                f"{path}.act_fn" if path else "act_fn")
    if not found:
        return ""
    what = "; ".join(f"{kind} ({', '.join(dict.fromkeys(paths[:2]))})" for kind, paths in found.items())
    return f"it applies {what}, which moec does not support; "
