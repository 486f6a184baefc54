"""The candidate configurations `lift` screens: what the module's attributes and the traced
router hints leave open, enumerated most plausible first.

`router_configs` yields `RouterConfig`s (top-k, score function, order, renormalisation, scaling,
groups, capacity, noise) from well-known attribute names (``top_k``, ``norm_topk_prob``,
``routed_scaling_factor``...) and `RouterHints`; `router_options` and `shared_options` list the
ways the router's and the shared expert's tensors may be read, each as a `Part` that `assemble`
joins with the experts' into the `ParamTensors` + `WeightsRecipe` of one candidate. Kept apart
from `moec.frontend.lift` so that the search driver there reads as a loop over these options.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterator

from ..spec import OVERFLOWS, MoESpecError, RouterConfig, SharedExpertConfig
from .experts import ExpertLayout
from .lifted import ParamTensors, Src, WeightsRecipe
from .router_hints import RouterHints
from .structure import Structure

_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected_experts", "moe_top_k",
            "experts_per_token", "top_k_experts", "router_topk", "moe_k")
_NORM_ATTRS = ("norm_topk_prob", "normalize_topk", "renormalize", "norm_topk", "renorm")
_SCALE_ATTRS = ("routed_scaling_factor", "routed_scaling", "scaling_factor", "route_scale")
_GROUP_ATTRS = ("n_group", "num_expert_group", "n_groups", "num_groups")
_TOPK_GROUP_ATTRS = ("topk_group", "num_topk_group", "topk_groups")
_CAP_ATTRS = ("capacity_factor", "expert_capacity_factor")
_FIXED_CAP_ATTRS = ("expert_capacity", "capacity")
_MIN_CAP_ATTRS = ("min_capacity",)
_OVERFLOW_ATTRS = ("overflow", "overflow_policy", "capacity_overflow")


@dataclass
class Part:
    """Some MoEWeights fields and the leaf tensors (paths) they are built from (local indices)."""

    paths: list
    fields: list
    desc: str = ""


def assemble(parts: list) -> tuple:
    """``(ParamTensors, WeightsRecipe)`` of ``parts`` joined in order (their indices shifted)."""
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


def dedupe(xs) -> list:
    """``xs`` without Nones and repeats, in first-seen order."""
    out = []
    for x in xs:
        if x is not None and x not in out:
            out.append(x)
    return out


def router_configs(st: Structure, hints: RouterHints, aux: bool, router_bias: bool, has_bias: bool,
                   has_noise: bool, width: int = 0) -> Iterator[RouterConfig]:
    """Candidate router configurations, most plausible first (``width``: the router's outputs, when more
    than the experts)."""
    E = width or st.E
    ks = dedupe([_attr(st, _K_ATTRS, int)] + list(hints.top_k) + list(range(1, min(E, 8) + 1)))
    ks = [k for k in ks if 1 <= k <= E]
    # sqrt(softplus) (DeepSeek-V4) only where the layer computes a softplus outside noise
    scores = dedupe([hints.score, "softmax", "sigmoid"] + (["sqrtsoftplus"] if hints.softplus else []))
    norm_attr = _attr(st, _NORM_ATTRS, bool)
    renorm_first = hints.renormalize if norm_attr is None else norm_attr
    if renorm_first is None:
        renorm_first = False
    scaling = dedupe([hints.scaling, _attr(st, _SCALE_ATTRS, float), _attr(st, _SCALE_ATTRS, int), 1.0])
    G, TG = _attr(st, _GROUP_ATTRS, int) or hints.n_group, _attr(st, _TOPK_GROUP_ATTRS, int) or hints.topk_group
    groups = []
    if G and G > 1 and TG:
        groups += [(G, TG, gs) for gs in dedupe([hints.group_score, "max", "top2_sum"])]
    groups.append((1, 1, "max"))
    caps = capacity_options(st)
    biases = [True, False] if has_bias else [False]
    noisy = [True, False] if has_noise else [False]
    for k, score in itertools.product(ks, scores):
        if score == "softmax":
            forms = [("score_then_topk", renorm_first), ("score_then_topk", not renorm_first), ("topk_then_score", False)]
            if hints.order == "topk_then_score":
                forms.insert(0, forms.pop())
        else:
            forms = [("score_then_topk", renorm_first), ("score_then_topk", not renorm_first)]
        if has_bias:                     # a selection bias on the logits rather than the scores (Kolibri)
            forms += [("logits_then_score", renorm_first), ("logits_then_score", not renorm_first)]
        counts = ("pairs", "first") if aux and k > 1 else ("pairs",)     # fairseq's l_aux: first choices
        for (order, renorm), scale, (g, tg, gs), bias, cap, nz, ac in itertools.product(
                forms, scaling, groups, biases, caps, noisy, counts):
            try:
                yield RouterConfig(num_experts=E, top_k=k, score=score, order=order, renormalize=renorm,
                                   routed_scaling=float(scale), score_bias=bias, router_bias=router_bias,
                                   n_group=g, topk_group=tg, group_score=gs, noisy=nz, aux_loss=aux, aux_counts=ac,
                                   **cap)
            except MoESpecError:
                continue


def token_configs(configs, tokens) -> Iterator[RouterConfig]:
    """``configs`` as they are, or for a layer that routes by token id (``tokens``: `TokenIds`) their token-table
    forms (`RouterConfig.token_table`: the table's k choices, weighted), each once."""
    if tokens is None:
        yield from configs
        return
    seen = set()
    for cfg in configs:
        if cfg.top_k != tokens.top_k:
            continue
        try:
            got = cfg.replace(token_table=True)
        except MoESpecError:
            continue
        if got not in seen:
            seen.add(got)
            yield got


def capacity_options(st: Structure) -> list:
    """Expert-capacity settings to try, as `RouterConfig` keywords: none, and for a capacity the module
    names (a factor, with a minimum, or a fixed ``expert_capacity``) its overflow rules, capacity groups
    (the call, each sequence), what a dropped pair does (nothing, or pass its token through) and whether
    the weights are normalised over the kept pairs."""
    cf = _attr(st, _CAP_ATTRS, float) or _attr(st, _CAP_ATTRS, int)
    fixed = _attr(st, _FIXED_CAP_ATTRS, int)
    sizes = []
    if cf and cf > 0:
        mc = _attr(st, _MIN_CAP_ATTRS, int)
        named = mc if mc is not None and mc >= 0 else None
        sizes += [{"capacity_factor": float(cf), "min_capacity": m} for m in dedupe([named, 1])]
        sizes += [{"capacity_factor": float(cf), "min_capacity": m, "capacity_round": "floor"}   # int() truncating
                  for m in dedupe([named, 0])]
    if fixed and fixed > 0:
        sizes.append({"expert_capacity": fixed})
    ov = _attr(st, _OVERFLOW_ATTRS, str)
    out = []
    for size, o, per, dropped in itertools.product(sizes, dedupe([ov if ov in OVERFLOWS else None, "drop", "next_best"]),
                                                   ("batch", "sequence"), ("zero", "pass")):
        if dropped == "zero" or o == "drop":
            out.append({**size, "overflow": o, "capacity_per": per, "dropped": dropped})
        if dropped == "zero":           # weights normalised over the kept pairs (fairseq, DeepSpeed)
            out.append({**size, "overflow": o, "capacity_per": per, "dropped": dropped, "renormalize_kept": True})
    return out + [{}]


def router_options(st: Structure, hints: RouterHints) -> list:
    """(part, has_score_bias, has_noise, router_bias, width, external router's path or None) options for the
    router's tensors (``width``: its outputs, `RouterCand.width`): its weights' readings first, then each child
    the compiled layer may call as an external router (`moec.spec.MoESpec.external_router`)."""
    out = []
    biases = dedupe([hints.score_bias] + st.score_biases)
    # a bias the trace saw added before top-k first; if the trace reached top-k without
    # one, try "no bias" first (an unused or zero buffer must not be read as a bias)
    reached = hints.found and bool(hints.top_k)
    ordered = (biases + [None]) if (hints.score_bias or not reached) else ([None] + biases)
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
            for b in ordered:
                p3, f3 = list(p2), list(f2)
                if b is not None:
                    if st.shapes.get(b, (0,))[-1] != r.width(st.E):
                        continue                    # a selection bias has one entry per choice
                    f3.append(("score_bias", Src((len(p3),), view=(r.width(st.E),)
                                                 if len(st.shapes.get(b, ())) != 1 else None)))
                    p3.append(b)
                desc = f"router {r.weight}" + (f" + bias {r.bias}" if r.bias else "") + \
                    (f", noise {nz.weight}" if nz else "") + (f", selection bias {b}" if b else "")
                out.append((Part(p3, f3, desc), b is not None, nz is not None, r.bias is not None, r.width(st.E),
                            None))
    for path in st.router_modules:
        for b in ordered:
            if b is not None and st.shapes.get(b, (0,))[-1] != st.E:
                continue
            fields = [("score_bias", Src((0,), view=(st.E,) if len(st.shapes.get(b, ())) != 1 else None))] if b else []
            desc = f"router: the module {path} (called as the forward calls it: an external router)" \
                + (f", selection bias {b}" if b else "")
            out.append((Part([b] if b else [], fields, desc), b is not None, False, False, st.E, path))
    return out


def shared_options(shared: dict, st: Structure, layout: ExpertLayout, why: list, external=()) -> list:
    """[(part or None, SharedExpertConfig or None, external path or None)]: each shared candidate the kernels
    compute (gated first), then each as an external shared expert (its own module, called as the forward calls
    it and added to the kernels' output: `moec.spec.MoEWeights.shared`; those of ``external``), then none.
    ``shared`` maps each candidate's path to its `ExpertLayout` or the reason it has none."""
    out = []
    for path, lay in shared.items():
        if isinstance(lay, str):
            if f"shared expert {lay}" not in why:
                why.append(f"shared expert {lay}")
            continue
        if (lay.glu, lay.activation) != (layout.glu, layout.activation):
            what = lambda la: f"{'GLU ' if la.glu else ''}{la.activation}" + (  # noqa: E731
                f" ({', '.join(f'{k}={v:g}' for k, v in la.variant)})" if la.variant else "")
            msg = (f"shared expert {path} computes {what(lay)} but the routed experts compute {what(layout)} "
                   f"(MoESpec has one activation)")
            if msg not in why:
                why.append(msg)
            continue
        # the same activation; a GLU variant of its own (HunYuan-V4: clamped routed experts, a plain shared one)
        own = None if lay.variant == layout.variant else tuple(lay.variant)
        for g in st.shared_gates + [None]:
            fields = list(lay.fields)
            paths = list(lay.paths)
            if g is not None:
                fields.append(("shared_gate_proj", Src((len(paths),))))
                paths.append(g)
            desc = f"shared expert {path} ({lay.desc}, width {lay.ffn})" + (f", sigmoid gate {g}" if g else "")
            if own is not None:
                desc += ", its own GLU variant: " + (", ".join(f"{k}={v:g}" for k, v in own) or "plain")
            out.append((Part(paths, fields, desc), SharedExpertConfig(width=lay.ffn, gated=g is not None,
                                                                      variant=own), None))
    for path in external:
        out.append((Part([], [], f"shared expert {path}: its own module, called as the forward calls it and added "
                                 f"to the kernels' output (an external shared expert)"), None, path))
    out.append((None, None, None))
    return out


def norm_options(st: Structure) -> list:
    """``[(part or None, eps or None)]``: no expert norm first, then each ``[E, d]`` norm weight with each eps its
    owner or the layer names (or a common one) as expert norms (`moec.spec.MoESpec.expert_norm`)."""
    out = [(None, None)]
    for path, eps_options in st.expert_norms:
        for eps in eps_options:
            out.append((Part([path], [("w_expert_norm", Src((0,)))], f"expert norms {path} (RMS, eps={eps:g})"), eps))
    return out


def config_text(cfg: RouterConfig) -> str:
    """``cfg`` as E, top_k and the fields that differ from the defaults (for notes and reasons)."""
    default = RouterConfig(num_experts=cfg.num_experts, top_k=cfg.top_k)
    diff = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if f.name not in ("num_experts", "top_k") and getattr(cfg, f.name) != getattr(default, f.name)]
    return f"E={cfg.num_experts}, top_k={cfg.top_k}" + (", " + ", ".join(diff) if diff else "")
