"""lift: module -> `LiftedMoE` (confirmed by the probe) | `NotLifted` (with the reason) | None.

A module whose class has a registered adapter (`moec.frontend.adapters`, e.g. Hugging Face
blocks the generic reader cannot read) is read by the adapter first; its `LiftedMoE` goes through
the same full probe. Otherwise (or when the adapter does not know the module's layout):
Steps: `structure.discover` finds the parts (experts, router, shared expert, biases, attributes);
`experts` reads the expert weights' roles (ModuleList experts are verified by calling them);
`capture` traces the forward as far as fx can and reads router hints off the graph; then the
candidate configurations the hints and attributes leave open are enumerated, most plausible
first. Each is screened cheaply on one probe input (expert outputs precomputed once, only the
routing recomputed), and the first that matches is put through the full probe (every input,
both training modes). Only a configuration that passed the probe is returned.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass
from typing import Iterator, Union

import torch
from torch import nn

from .. import reference
from ..spec import OVERFLOWS, MoESpec, MoESpecError, RouterConfig, SharedExpertConfig
from .adapters import adapter_for
from .capture import module_calls_depend_on, read_router, stacked_usage, trace_partial
from .experts import ExpertLayout, list_layout, shared_layout, stacked_layouts
from .lifted import LiftedMoE, NotLifted, ParamTensors, Src, WeightsRecipe, resolve
from .probe import TOKENS, Prober, probe
from .structure import Structure, discover, meta_or_none

_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected_experts", "moe_top_k",
            "experts_per_token", "top_k_experts", "router_topk", "moe_k")
_NORM_ATTRS = ("norm_topk_prob", "normalize_topk", "renormalize", "norm_topk", "renorm")
_SCALE_ATTRS = ("routed_scaling_factor", "routed_scaling", "scaling_factor", "route_scale")
_GROUP_ATTRS = ("n_group", "num_expert_group", "n_groups", "num_groups")
_TOPK_GROUP_ATTRS = ("topk_group", "num_topk_group", "topk_groups")
_CAP_ATTRS = ("capacity_factor", "expert_capacity_factor")
_OVERFLOW_ATTRS = ("overflow", "overflow_policy", "capacity_overflow")
MAX_SCREENS = 4000
_SCREEN_INPUT = 2          # 48 random tokens


@dataclass
class _Part:
    """Some MoEWeights fields and the leaf tensors (paths) they are built from (local indices)."""

    paths: list
    fields: list
    desc: str = ""


def _assemble(parts: list) -> tuple:
    paths, fields = [], []
    for p in parts:
        off = len(paths)
        paths += p.paths
        fields += [(n, dataclasses.replace(s, indices=tuple(i + off for i in s.indices))) for n, s in p.fields]
    return ParamTensors(tuple(paths)), WeightsRecipe(tuple(fields))


def _attr(st: Structure, names, kind):
    for n in names:
        v = st.attrs.get(n)
        if isinstance(v, kind) and not (kind is not bool and isinstance(v, bool)):
            return v
    return None


def _extra_required_args(module: nn.Module) -> list:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    req = [p.name for p in sig.parameters.values() if p.default is p.empty and p.kind in kinds]
    return req[1:]


def _dedupe(xs):
    out = []
    for x in xs:
        if x is not None and x not in out:
            out.append(x)
    return out


def _router_configs(st: Structure, hints, aux: bool, router_bias: bool, has_bias: bool,
                    has_noise: bool) -> Iterator[RouterConfig]:
    """Candidate router configurations, most plausible first."""
    E = st.E
    ks = _dedupe([_attr(st, _K_ATTRS, int)] + list(hints.top_k) + list(range(1, min(E, 8) + 1)))
    ks = [k for k in ks if 1 <= k <= E]
    scores = _dedupe([hints.score, "softmax", "sigmoid"])
    norm_attr = _attr(st, _NORM_ATTRS, bool)
    renorm_first = hints.renormalize if norm_attr is None else norm_attr
    if renorm_first is None:
        renorm_first = False
    scaling = _dedupe([hints.scaling, _attr(st, _SCALE_ATTRS, float), _attr(st, _SCALE_ATTRS, int), 1.0])
    G, TG = _attr(st, _GROUP_ATTRS, int) or hints.n_group, _attr(st, _TOPK_GROUP_ATTRS, int) or hints.topk_group
    groups = []
    if G and G > 1 and TG:
        groups += [(G, TG, gs) for gs in _dedupe([hints.group_score, "max", "top2_sum"])]
    groups.append((1, 1, "max"))
    cf = _attr(st, _CAP_ATTRS, float) or _attr(st, _CAP_ATTRS, int)
    caps = [(None, "drop")]
    if cf and cf > 0:
        ov = _attr(st, _OVERFLOW_ATTRS, str)
        caps = [(float(cf), o) for o in _dedupe([ov if ov in OVERFLOWS else None, "drop", "next_best"])] + caps
    biases = [True, False] if has_bias else [False]
    noisy = [True, False] if has_noise else [False]
    for k, score in itertools.product(ks, scores):
        if score == "softmax":
            forms = [("score_then_topk", renorm_first), ("score_then_topk", not renorm_first), ("topk_then_score", False)]
            if hints.order == "topk_then_score":
                forms.insert(0, forms.pop())
        else:
            forms = [("score_then_topk", renorm_first), ("score_then_topk", not renorm_first)]
        for (order, renorm), scale, (g, tg, gs), bias, (c, ov), nz in itertools.product(
                forms, scaling, groups, biases, caps, noisy):
            try:
                yield RouterConfig(num_experts=E, top_k=k, score=score, order=order, renormalize=renorm,
                                   routed_scaling=float(scale), score_bias=bias, router_bias=router_bias,
                                   n_group=g, topk_group=tg, group_score=gs, capacity_factor=c, overflow=ov,
                                   noisy=nz, aux_loss=aux)
            except MoESpecError:
                continue


def _router_parts(st: Structure, hints) -> list:
    """(part, has_score_bias, has_noise, router_bias) options for the router's tensors."""
    out = []
    biases = _dedupe([hints.score_bias] + st.score_biases)
    for r in st.routers:
        paths = [r.weight] + ([r.bias] if r.bias else [])
        fields = [("w_router", Src((0,), transpose=r.layout == "in_out"))]
        if r.bias:
            fields.append(("b_router", Src((1,))))
        noise_opts = [st.noises[0]] if st.noises else [None]
        for nz in noise_opts:
            p2, f2 = list(paths), list(fields)
            if nz is not None:
                f2.append(("w_noise", Src((len(p2),), transpose=nz.layout == "in_out")))
                p2.append(nz.weight)
            # a bias the trace saw added before top-k first; if the trace reached top-k without
            # one, try "no bias" first (an unused or zero buffer must not be read as a bias)
            reached = hints.found and bool(hints.top_k)
            for b in (biases + [None]) if (hints.score_bias or not reached) else ([None] + biases):
                p3, f3 = list(p2), list(f2)
                if b is not None:
                    f3.append(("score_bias", Src((len(p3),))))
                    p3.append(b)
                desc = f"router {r.weight}" + (f" + bias {r.bias}" if r.bias else "") + \
                    (f", noise {nz.weight}" if nz else "") + (f", selection bias {b}" if b else "")
                out.append((_Part(p3, f3, desc), b is not None, nz is not None, r.bias is not None))
    return out


def _shared_options(shared: dict, st: Structure, layout: ExpertLayout, why: list) -> list:
    """[(part or None, SharedExpertConfig or None)]: each shared candidate (gated first), then none.
    ``shared`` maps each candidate's path to its `ExpertLayout` or the reason it has none."""
    out = []
    for path, lay in shared.items():
        if isinstance(lay, str):
            if f"shared expert {lay}" not in why:
                why.append(f"shared expert {lay}")
            continue
        if (lay.glu, lay.activation) != (layout.glu, layout.activation):
            msg = (f"shared expert {path} computes {'GLU ' if lay.glu else ''}{lay.activation} but the routed "
                   f"experts compute {'GLU ' if layout.glu else ''}{layout.activation} (MoESpec has one activation)")
            if msg not in why:
                why.append(msg)
            continue
        for g in st.shared_gates + [None]:
            fields = list(lay.fields)
            paths = list(lay.paths)
            if g is not None:
                fields.append(("shared_gate_proj", Src((len(paths),))))
                paths.append(g)
            desc = f"shared expert {path} ({lay.desc}, width {lay.ffn})" + (f", sigmoid gate {g}" if g else "")
            out.append((_Part(paths, fields, desc), SharedExpertConfig(width=lay.ffn, gated=g is not None)))
    out.append((None, None))
    return out


def _cfg_text(cfg: RouterConfig) -> str:
    default = RouterConfig(num_experts=cfg.num_experts, top_k=cfg.top_k)
    diff = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if f.name not in ("num_experts", "top_k") and getattr(cfg, f.name) != getattr(default, f.name)]
    return f"E={cfg.num_experts}, top_k={cfg.top_k}" + (", " + ", ".join(diff) if diff else "")


class _ExpertRows:
    """Expert outputs on the screening tokens, computed only for the (expert, token) pairs that
    some candidate routing asks for (so screening costs about what the eager layer costs)."""

    def __init__(self, xf: torch.Tensor, weights: dict, layout: ExpertLayout, E: int):
        self.xf, self.w, self.layout = xf, weights, layout
        self.Y = xf.new_zeros(E, *xf.shape)
        self.have = torch.zeros(E, xf.shape[0], dtype=torch.bool, device=xf.device)

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids >= 0
        tok = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        need = torch.zeros_like(self.have)
        need[ids[valid], tok[valid]] = True
        need &= ~self.have
        w, lay = self.w, self.layout
        for e in need.any(1).nonzero().flatten().tolist():
            rows = need[e].nonzero().flatten()
            self.Y[e, rows] = reference.expert_mlp(self.xf[rows], w["w_up"][e], w["w_down"][e],
                                                   w["w_gate"][e] if lay.glu else None, lay.activation)
        self.have |= need
        return self.Y


def _screen_y(xf, w, cfg, experts: _ExpertRows, S, noise):
    logits = reference.router_logits(xf, w.w_router, w.b_router, w.w_noise, noise)
    ids, wts, aux = reference.route(logits, cfg, w.score_bias)
    T = xf.shape[0]
    valid = ids >= 0
    Y = experts.get(ids)
    y = (Y[ids.clamp(min=0), torch.arange(T, device=xf.device)[:, None]] * (wts * valid)[..., None]).sum(1)
    return (y + S if S is not None else y), aux


def _formulation(st: Structure, cap, router_paths: set) -> tuple:
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


def lift(module: nn.Module) -> Union[LiftedMoE, NotLifted, None]:
    """Recognise ``module`` as an MoE layer. Never raises: a crash in analysis is a `NotLifted`."""
    try:
        return _lift(module)
    except Exception as e:  # noqa: BLE001
        return NotLifted(f"{type(module).__name__}: analysis failed: {type(e).__name__}: {e}")


_EXPERT_FIELDS = ("w_up", "w_down", "w_gate", "shared_up", "shared_down", "shared_gate")


def _observed(module: nn.Module, paths, recipe: WeightsRecipe) -> tuple:
    """The child module holding the router weight, when it holds no expert weights (so it is the
    router alone): the compiled forward calls it when it has forward hooks (`LiftedMoE.observed`)."""
    fields = dict(recipe.fields)
    router_path = paths[fields["w_router"].indices[0]]
    if "." not in router_path:
        return ()
    top = router_path.split(".", 1)[0]
    experts = {paths[i].split(".", 1)[0] for name, src in recipe.fields if name in _EXPERT_FIELDS for i in src.indices}
    if top in experts or not isinstance(getattr(module, top, None), nn.Module):
        return ()
    return (top,)


def _lift_with_adapter(module: nn.Module):
    ad = adapter_for(module)
    if ad is None:
        return None
    got = ad.build(module)
    if not isinstance(got, LiftedMoE):
        return got
    cls = type(module).__name__
    meta = meta_or_none(module)
    if meta:
        return NotLifted(f"{cls}: {meta}")
    msg = probe(module, got)
    if msg:
        return NotLifted(f"{cls}: the {ad.name} adapter's reading does not reproduce the module's forward: {msg}")
    dtype = str(got.param_tensors(module)[-1].dtype).replace("torch.", "")
    got.notes = [f"read by the {ad.name} adapter"] + list(got.notes) + [
        f"router: {_cfg_text(got.spec.router)}",
        *("weights: " + line for line in got.weights.describe(got.param_tensors.paths)),
        f"probe: eager forward matched moec.reference.moe for T={', '.join(map(str, TOKENS))} "
        f"(the last leaning on one expert) in training and eval mode ({dtype})"]
    return got


def _lift(module: nn.Module):
    cls = type(module).__name__
    if not isinstance(module, nn.Module):
        return None
    got = _lift_with_adapter(module)
    if got is not None:
        return got
    st = discover(module)
    if st is None:
        return None
    meta = meta_or_none(module)
    if meta:
        return NotLifted(f"{cls}: {meta}")
    extra = _extra_required_args(module)
    if extra:
        return NotLifted(f"{cls}: forward takes extra required argument(s) {', '.join(map(repr, extra))}; "
                         f"moec lifts layers called as forward(hidden_states)")
    if st.expert_biases:
        return NotLifted(f"{cls}: per-expert biases {', '.join(st.expert_biases)} are not supported "
                         f"(MoESpec experts are bias-free)")
    notes = [st.describe()]

    # the forward, traced as far as fx goes
    leaves = [module.get_submodule(p) for p in st.expert_paths + st.shared]
    router_modules = {r.module for r in st.routers + st.noises if r.module}
    router_params = {r.weight for r in st.routers}
    cap = trace_partial(module, leaves)
    hints = read_router(cap, st.E, router_modules, router_params, st.shapes)
    if st.noises and not hints.noisy and not module.training:   # noise is usually added in training only
        in_training = read_router(trace_partial(module, leaves, training=True), st.E, router_modules,
                                  router_params, st.shapes)
        if in_training.found:
            hints = in_training
    notes.append(cap.describe_stop())
    notes.append(hints.summary())

    # experts
    if st.experts is not None:
        layout = list_layout(module, st)
        if isinstance(layout, str):
            return NotLifted(f"{cls}: {layout}")
        layouts = [layout]
    else:
        layouts = stacked_layouts(st, hints.activations)
        if not layouts:
            shapes = ", ".join(f"{p} {list(s)}" for p, s in st.stacked)
            return NotLifted(f"{cls}: stacked expert parameters {shapes} do not form gate/up/down projections "
                             f"of hidden size {st.d}")
    formulation, how = _formulation(st, cap, router_modules | router_params)
    notes.append(f"formulation: {formulation} ({how})")

    pr = Prober(module, st.d, st.E, st.dtype, st.device)
    msg = pr.setup()
    if msg:
        return NotLifted(f"{cls}: {msg}")
    outputs = pr.outputs
    r0 = st.routers[0]
    w0 = resolve(module, r0.weight)
    pr.set_skew(w0 if r0.layout == "out_in" else w0.t())

    why: list = []
    tried = 0
    first_fail = None
    x_screen = pr.x(_SCREEN_INPUT).reshape(-1, st.d)
    xf = x_screen.float()
    training = module.training
    noise_dtypes = _dedupe([st.dtype, torch.float32])
    router_parts = _router_parts(st, hints)
    shared = {p: shared_layout(module, p, st) for p in st.shared}
    for layout in layouts:
        exp_part = _Part(layout.paths, layout.fields, layout.desc)
        shared_opts = _shared_options(shared, st, layout, why)
        with torch.no_grad():
            experts = _ExpertRows(xf, layout.build([resolve(module, p) for p in layout.paths]), layout, st.E)
        for sh_part, sh_cfg in shared_opts:
            for r_part, has_bias, has_noise, router_bias in router_parts:
                parts = [r_part, exp_part] + ([sh_part] if sh_part else [])
                param_tensors, recipe = _assemble(parts)
                with torch.no_grad():
                    w = recipe(param_tensors(module))
                    S = None
                    if sh_cfg is not None:
                        S = reference.expert_mlp(xf, w.shared_up, w.shared_down, w.shared_gate if layout.glu else None,
                                                 layout.activation)
                        if sh_cfg.gated:
                            S = S * torch.sigmoid(xf @ w.shared_gate_proj.float().t())
                for cfg in _router_configs(st, hints, outputs == "y_aux", router_bias, has_bias, has_noise):
                    try:
                        spec = MoESpec(hidden=st.d, ffn=layout.ffn, router=cfg, activation=layout.activation,
                                       glu=layout.glu, shared=sh_cfg)
                    except MoESpecError:
                        continue
                    for nd in (noise_dtypes if cfg.noisy else [None]):
                        tried += 1
                        if tried > MAX_SCREENS:
                            return NotLifted(f"{cls}: no configuration found within {MAX_SCREENS} candidates"
                                             + (f"; first candidate ({first_fail})" if first_fail else ""))
                        with torch.no_grad():
                            noise = pr.noise(_SCREEN_INPUT, nd) if (training and cfg.noisy) else None
                            y_ref, aux = _screen_y(xf, w, cfg, experts, S, noise)
                            msg = pr.compare(_SCREEN_INPUT, training, spec, w, outputs, nd, y_ref=y_ref, aux=aux)
                        if msg:
                            if first_fail is None:
                                first_fail = f"{_cfg_text(cfg)}: {msg}"
                            continue
                        lifted = LiftedMoE(spec=spec, formulation=formulation, param_tensors=param_tensors,
                                           weights=recipe, outputs=outputs,
                                           noise_dtype=(nd or st.dtype) if cfg.noisy else None, notes=list(notes),
                                           observed=_observed(module, param_tensors.paths, recipe))
                        msg = pr.check(lifted)
                        if msg:
                            if first_fail is None or first_fail.startswith(_cfg_text(cfg)):
                                first_fail = f"{_cfg_text(cfg)}: {msg}"
                            continue
                        _finish_notes(lifted, parts, layout, sh_part, cfg, tried, st)
                        return lifted
    reason = f"{cls}: no candidate configuration reproduces the module's forward ({tried} tried"
    reason += f"; the most plausible, {first_fail})" if first_fail else ")"
    if why:
        reason += "; " + "; ".join(why)
    return NotLifted(reason)


def _finish_notes(lifted: LiftedMoE, parts, layout: ExpertLayout, sh_part, cfg, tried: int, st: Structure) -> None:
    n = lifted.notes
    n.append(f"experts: {layout.desc}" + (" (verified by calling each expert)" if layout.verified
                                         else " (reading chosen by the probe)"))
    n.append(parts[0].desc)
    if sh_part is not None:
        n.append(sh_part.desc)
    n.append(f"router: {_cfg_text(cfg)}")
    if cfg.noisy:
        n.append(f"noisy gating: training-mode noise drawn as randn([T, E]) in {lifted.noise_dtype}")
    n.extend("weights: " + line for line in lifted.weights.describe(lifted.param_tensors.paths))
    n.append(f"probe: eager forward matched moec.reference.moe for T={', '.join(map(str, TOKENS))} "
             f"(the last leaning on one expert) in training and eval mode ({str(st.dtype).replace('torch.', '')}; candidate {tried} of the search)")


def find_moe_modules(model: nn.Module) -> list:
    """``[(qualified name, module)]`` of MoE-like modules (experts + router directly owned, or a class
    with a registered adapter), top-down; a module found is not descended into. Whether each lifts is `lift`'s question."""
    found: list = []

    def visit(prefix: str, m: nn.Module) -> None:
        if adapter_for(m) is not None:
            found.append((prefix, m))
            return
        try:
            st = discover(m)
        except Exception:  # noqa: BLE001 - an odd module is simply not a candidate
            st = None
        if st is not None:
            found.append((prefix, m))
            return
        for name, child in m.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found
