"""Structure: find an MoE layer's parts by looking at the module tree (no tracing, no running).

An MoE layer, for moec, is a module that directly owns
- experts: a child ``nn.ModuleList``/``nn.ModuleDict`` of >= 2 same-class MLPs (2-3 linears each),
  or 3-D parameters with a common leading dim E (on the module or one child), and
- a router: an ``nn.Linear(d, E)`` or an ``[E, d]`` / ``[d, E]`` parameter, at most two levels down, or
  a child named like a router that holds a network ending in E outputs (a small MLP: an external router,
  which the compiled layer calls as the forward does, `moec.spec.MoESpec.external_router`).
Optional parts: a shared expert (an MLP child, preferably named ``shared*``), a shared-expert gate
(``nn.Linear(d, 1)``), a per-expert selection bias (a 1-D tensor of size E), a noise projection
(a second d->E projection whose name contains ``noise``), and plain attributes (``top_k``, ...).
Everything found here is a candidate; `moec.frontend.lift` lets the probe decide.
"""
from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .linears import as_linear, linears

_EXPERT_NAMES = ("expert",)
_ROUTER_NAMES = ("gate", "router", "gating", "classifier", "wg", "w_gate", "route")
_SHARED_NAMES = ("shared",)


@dataclass
class RouterCand:
    """A d->E projection: ``weight`` path, ``layout`` 'out_in' ([E, d], nn.Linear) or 'in_out' ([d, E]);
    ``choices``: its outputs when they are more than the experts (the rest may be identity experts; the
    probe decides), else 0."""

    weight: str
    layout: str = "out_in"
    bias: Optional[str] = None
    module: Optional[str] = None     # the nn.Linear's path, when it is one
    choices: int = 0

    def width(self, E: int) -> int:
        """The router's outputs: the experts' count ``E``, or its ``choices``."""
        return self.choices or E


@dataclass
class Structure:
    d: int
    E: int
    dtype: torch.dtype
    device: torch.device
    experts: Optional[str]                  # ModuleList/ModuleDict path (None: stacked weights)
    expert_paths: list = field(default_factory=list)   # one module path per expert, in expert order
    stacked: list = field(default_factory=list)        # [(path, shape)] 3-D parameters
    expert_biases: list = field(default_factory=list)  # [E, *] parameters named *bias*
    expert_norms: list = field(default_factory=list)   # [(path, eps candidates)]: [E, d] tensors named *norm*
    routers: list = field(default_factory=list)        # [RouterCand], best first
    router_modules: list = field(default_factory=list) # paths of children that may be external routers
    noises: list = field(default_factory=list)         # [RouterCand]
    score_biases: list = field(default_factory=list)   # paths of [E] tensors
    shared: list = field(default_factory=list)         # module paths of shared-expert MLPs, best first
    shared_gates: list = field(default_factory=list)   # weight paths of Linear(d, 1)
    attrs: dict = field(default_factory=dict)          # plain int/float/bool/str attributes
    shapes: dict = field(default_factory=dict)         # every tensor path -> shape
    expert_class: str = ""

    def describe(self, router: Optional[str] = None) -> str:
        """The parts in one line, with ``router`` (its words) or the most plausible router candidate."""
        if self.experts is not None:
            what = f"{self.experts} ({len(self.expert_paths)} x {self.expert_class})"
        else:
            what = ", ".join(f"{p} {list(s)}" for p, s in self.stacked)
        if router is None and not self.routers:
            router = f"router: the module {self.router_modules[0]} (called as the forward calls it)"
        if router is None:
            r = self.routers[0]
            router = f"router: {r.weight} ({'[E, d]' if r.layout == 'out_in' else '[d, E]'})"
        return f"experts: {what}; {router}"


def _linears(m: nn.Module) -> list:
    return [(n, lin) for n, _, lin in linears(m)]


def _mlp_like(m: nn.Module) -> bool:
    lin = _linears(m)
    return 2 <= len(lin) <= 3 and not any(isinstance(x, (nn.ModuleList, nn.ModuleDict)) for x in m.modules())


def _depth(path: str) -> int:
    return path.count(".")


def _score(path: str, words) -> int:
    leaf = path.lower()
    return sum(w in leaf for w in words)


def _expert_list(name: str, child: nn.Module):
    if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
        items = list(child.named_children())
        if len(items) >= 2 and len({type(c) for _, c in items}) == 1 and all(_mlp_like(c) for _, c in items):
            return (name, [f"{name}.{k}" for k, _ in items], type(items[0][1]).__name__)
    return None


def _expert_containers(module: nn.Module):
    """``[(path, expert paths, expert class)]``: lists of like MLPs among the children, or one level
    further inside a child named *expert* that is no MoE layer itself (a wrapper: ``self.experts.experts``)."""
    out = []
    for name, child in module.named_children():
        got = _expert_list(name, child)
        if got is None and _score(name, _EXPERT_NAMES) and not isinstance(child, (nn.ModuleList, nn.ModuleDict)) \
                and discover(child) is None:
            got = next((g for sub, c in child.named_children() for g in [_expert_list(f"{name}.{sub}", c)] if g), None)
        if got is not None:
            out.append(got)
    out.sort(key=lambda t: -_score(t[0], _EXPERT_NAMES))
    return out


def _stacked_params(module: nn.Module, keep=lambda path: True):
    """3-D parameters on the module or one child (not in a ModuleList or a convolution; ``keep``-ing
    their path), the largest group by leading dim: ``(E, [(path, shape)])``."""
    groups: dict = {}
    for path, p in module.named_parameters():
        if p.dim() == 3 and _depth(path) <= 1 and p.shape[0] >= 2 and keep(path):
            owner = module.get_submodule(path.rsplit(".", 1)[0]) if "." in path else module
            if isinstance(owner, (nn.ModuleList, nn.ModuleDict, nn.modules.conv._ConvNd)):
                continue            # a convolution's kernel (e.g. a Mamba mixer's conv1d) is no expert
            groups.setdefault(p.shape[0], []).append((path, tuple(p.shape)))
    if not groups:
        return None, []
    E, params = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    return E, params


def _owner(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path.rsplit(".", 1)[0]) if "." in path else module


def _single_linear(module: nn.Module, path: str) -> bool:
    """Whether the top-level child holding the linear at ``path`` holds no other linear (a router, not an MLP)."""
    top = module.get_submodule(path.split(".")[0])
    return len(_linears(top)) <= 1


def _router_modules(module: nn.Module, E: int, dims: set, excluded) -> list:
    """``[(path, d)]``: children named like a router (by name or class) that are no single linear and hold
    linears, one reading a width ``d`` of the experts' (their input) and one with ``E`` outputs: candidates
    for an external router (the probe decides)."""
    out = []
    for name, child in module.named_children():
        if excluded(name) or isinstance(child, (nn.ModuleList, nn.ModuleDict)) or as_linear(child) is not None:
            continue
        if not (_score(name, _ROUTER_NAMES) or _score(type(child).__name__, ("router", "gate", "gating"))):
            continue
        lins = [lin for _, lin in _linears(child)]
        reads = [lin.in_features for lin in lins if lin.in_features in dims]
        if reads and any(lin.out_features == E for lin in lins):
            out.append((name, reads[0]))
    return out


def discover(module: nn.Module):
    """A `Structure` when ``module`` directly holds experts and a router, else ``None``."""
    containers = _expert_containers(module)
    expert_paths: list = []
    stacked: list = []
    experts_path = None
    if containers:
        experts_path, expert_paths, cls_name = containers[0]
        E = len(expert_paths)
    else:
        E, stacked = _stacked_params(module)
        cls_name = None
        if not stacked:
            return None
    inside = (experts_path + ".") if experts_path else None

    def excluded(path: str) -> bool:
        return bool(inside) and (path + ".").startswith(inside)

    shapes = {p: tuple(t.shape) for p, t in list(module.named_parameters()) + list(module.named_buffers())}
    # routers: nn.Linear(d, E) or free [E, d] / [d, E] parameters, at most two levels down
    routers, seen_weights, wide = [], set(), []
    for path, _, lin in linears(module):
        if path and _depth(path) <= 1 and not excluded(path) and lin.out_features == E:
            w = f"{path}.weight"
            seen_weights.add(w)
            routers.append(RouterCand(w, "out_in", f"{path}.bias" if lin.bias is not None else None, path))
        elif (path and _depth(path) <= 1 and not excluded(path) and lin.out_features > E
              and _score(path, _ROUTER_NAMES) and _single_linear(module, path)):
            # more choices than experts: identity experts (LongCat); not a layer of an MLP router
            wide.append(RouterCand(f"{path}.weight", "out_in", f"{path}.bias" if lin.bias is not None else None,
                                   path, choices=lin.out_features))
    if not routers:             # a router with one output per expert comes first: a wider one only without it
        routers, seen_weights = wide, {r.weight for r in wide}
    for path, p in module.named_parameters():
        if p.dim() != 2 or path in seen_weights or excluded(path) or _depth(path) > 1 or "bias" in path.split(".")[-1]:
            continue
        if as_linear(_owner(module, path)) is not None:
            continue
        if p.shape[0] == E and p.shape[1] != E:
            routers.append(RouterCand(path, "out_in"))
        elif p.shape[1] == E and p.shape[0] != E:
            routers.append(RouterCand(path, "in_out"))
        elif p.shape == (E, E):
            routers += [RouterCand(path, "out_in"), RouterCand(path, "in_out")]
    noises = [r for r in routers if "noise" in r.weight.lower()]
    # (an [E, d] weight named *norm* is the experts' norms, read below, not a router)
    routers = [r for r in routers if "noise" not in r.weight.lower() and not (r.module is None and "norm" in r.weight.lower())]
    routers.sort(key=lambda r: -_score(r.weight, _ROUTER_NAMES))

    def in_dim(r: RouterCand) -> int:
        s = shapes[r.weight]
        return s[1] if r.layout == "out_in" else s[0]

    # a router reads the experts' input: a last layer of an MLP router (its input a hidden width) is none
    if expert_paths:
        dims = {n for t in module.get_submodule(expert_paths[0]).parameters() for n in t.shape}
    else:
        dims = {n for _, shape in stacked for n in shape[1:]}
    called = _router_modules(module, E, dims, excluded)
    # a linear inside a router network that does not read the network's input is one of its later layers
    inner = {p: n for p, n in called}
    routers = [r for r in routers if in_dim(r) in dims and inner.get(r.weight.split(".")[0], in_dim(r)) == in_dim(r)]
    if not routers and not called:
        return None

    d = in_dim(routers[0]) if routers else called[0][1]
    routers = [r for r in routers if in_dim(r) == d]
    noises = [r for r in noises if in_dim(r) == d]

    # dtype/device: of the expert weights (routers are sometimes kept in fp32)
    if expert_paths:
        ref = next(iter(module.get_submodule(expert_paths[0]).parameters()))
    else:
        ref = module.get_parameter(stacked[0][0])
    st = Structure(d=d, E=E, dtype=ref.dtype, device=ref.device, experts=experts_path,
                   expert_paths=expert_paths, stacked=stacked, routers=routers, noises=noises, shapes=shapes,
                   router_modules=[p for p, n in called if n == d])
    st.expert_class = cls_name or ""

    # per-expert biases of stacked experts
    if stacked:
        for path, p in module.named_parameters():
            if p.dim() == 2 and p.shape[0] == E and "bias" in path.split(".")[-1].lower() and _depth(path) <= 1:
                st.expert_biases.append(path)
    # expert norms: an [E, d] tensor named *norm* (Ergo's post_expert_norm.weight), with the eps its owner or the
    # layer names
    for path, t in list(module.named_parameters()) + list(module.named_buffers()):
        if tuple(t.shape) == (E, d) and "norm" in path.lower() and _depth(path) <= 2 and "shared" not in path.lower():
            owner = _owner(module, path)
            named = [getattr(owner, a, None) for a in ("eps", "variance_epsilon", "epsilon")]
            named += [getattr(getattr(module, "config", None), a, None) for a in ("rms_norm_eps", "norm_eps")]
            eps = [float(e) for e in named if isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0]
            # (then common ones, and fp32's machine epsilon: F.rms_norm's eps=None on fp32 rows)
            st.expert_norms.append((path, tuple(dict.fromkeys(eps + [1e-6, 1e-5, torch.finfo(torch.float32).eps]))))
    # selection bias: an [E] (or [1, E]) tensor that is not a linear's bias, on the layer or its router (ERNIE
    # keeps it in a submodule of the router: gate.moe_statics.e_score_correction_bias [1, E])
    widths = {r.width(E) for r in routers} | ({E} if st.router_modules else set())
    for path, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.numel() in widths and t.shape[-1] == t.numel() and t.dim() <= 2 and not excluded(path) \
                and _depth(path) <= 2 and path not in st.expert_biases:
            if as_linear(_owner(module, path)) is not None:
                continue
            st.score_biases.append(path)
    # shared experts and their gates
    for cname, child in module.named_children():
        if cname == experts_path or isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            continue
        if _mlp_like(child):
            lin = _linears(child)
            if any(l.in_features == d for _, l in lin) and any(l.out_features == d for _, l in lin):
                st.shared.append(cname)
    st.shared.sort(key=lambda p: -_score(p, _SHARED_NAMES))
    shared_prefixes = tuple(p + "." for p in st.shared)
    for path, _, lin in linears(module):
        if (path and _depth(path) <= 1 and not excluded(path)
                and lin.out_features == 1 and lin.in_features == d and not (path + ".").startswith(shared_prefixes)):
            st.shared_gates.append(f"{path}.weight")
    # plain attributes, the module's own first, then its children's, then a config object
    sources = [module] + [c for n, c in module.named_children() if n != experts_path]
    cfg = getattr(module, "config", None)
    if cfg is not None:
        sources.append(cfg)
    for src in sources:
        for k, v in vars(src).items():
            if isinstance(v, (int, float, bool, str)) and not k.startswith("_") and k not in st.attrs:
                st.attrs[k] = v
    return st


def meta_or_none(module: nn.Module) -> Optional[str]:
    for path, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            return f"{path} is on the meta device (no values to read or probe; materialise the module first)"
    return None


def _roots(st: Structure) -> tuple[set, set]:
    """The top-level children holding the experts and the shared experts."""
    experts = {st.experts.split(".")[0]} if st.experts else {path.split(".")[0] for path, _ in st.stacked}
    return experts, {path.split(".")[0] for path in st.shared}


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(m).__name__.endswith("Norm")


def output_norms(module: nn.Module, st: Structure) -> list:
    """Paths of the module's norm children outside its experts, router and shared expert that normalise each
    row on its own (`_rowwise`): candidates for a norm the forward applies to the combined output (the probe
    decides). A norm over other dims (GroupNorm's channels, BatchNorm's batch) is none: applied to the
    kernels' output its result would depend on how the rows are shaped."""
    expert_roots, shared_roots = _roots(st)
    taken = expert_roots | shared_roots | {r.weight.split(".")[0] for r in st.routers} | set(st.router_modules)
    return [name for name, m in module.named_children()
            if name not in taken and _is_norm(m) and _rowwise(m, st.d, st.dtype, st.device)]


def _rowwise(m: nn.Module, d: int, dtype, device) -> bool:
    """Whether ``m`` (a copy, RNG forked) maps rows of width ``d`` one by one: the same result on ``[6, d]``,
    ``[2, 3, d]`` and each row alone."""
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(3)).to(dtype=dtype, device=device)
    try:
        m = copy.deepcopy(m)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            flat = m(x)
            shaped = m(x.reshape(2, 3, d)).reshape(6, d)
            alone = torch.cat([m(x[i:i + 1]) for i in range(6)])
    except Exception:  # noqa: BLE001 - a module that cannot take rows of any shape is not row-wise
        return False
    return all(isinstance(y, torch.Tensor) and y.shape == (6, d) for y in (flat, shaped, alone)) and \
        torch.allclose(flat, shaped) and torch.allclose(flat, alone)
