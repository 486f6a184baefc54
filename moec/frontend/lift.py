"""lift: module -> `LiftedMoE` (confirmed by the probe) | `NotLifted` (with the reason) | None.

A module whose class has a registered adapter (`moec.frontend.adapters`, e.g. Hugging Face
blocks the generic reader cannot read) is read by the adapter first; its `LiftedMoE` goes through
the same full probe. Otherwise (or when the adapter does not know the module's layout):
Steps: `structure.discover` finds the parts (experts, router, shared expert, biases, attributes);
`call_shape` says in words why a module cannot be called as ``forward(hidden_states)`` (extra required
arguments, token ids, attention beside the MoE); `formulation` reads how the traced forward reaches its
experts; `experts` reads the expert weights' roles (ModuleList experts are verified by calling them);
`trace.trace_partial` traces the forward as far as fx can and `router_hints` reads router hints
off the graph (both read graphs with `fx_ops`); then `candidates` enumerates the configurations
the hints and attributes leave open, most plausible first. Each is screened cheaply on one probe
input (`screen`: expert outputs precomputed once, only the routing recomputed), and the first that matches
is put through the full probe (every input, both training modes). Only a configuration that
passed the probe is returned.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .. import reference
from ..spec import MoESpec, MoESpecError
from .accounting import Coverage, unaccounted
from .adapters import adapter_for
from .call_shape import extra_required_args, inside_a_bigger_layer, token_id_args
from .candidates import (Part, assemble, capacity_options, config_text, dedupe, norm_options, router_configs,
                         router_options, shared_options, token_configs)
from .experts import ExpertLayout, list_layout, shared_layout
from .formulation import read_formulation, scaled_expert_input, scaled_input_reason
from .lifted import LiftedMoE, NotLifted, WeightsRecipe, resolve, with_children
from .idle_experts import idle_expert_grads
from .outputs import slots
from .probe import TOKENS, Prober, mode_name, probe, probe_seed
from .probe_harness import hooks_off
from .router_call import external_call, router_calls
from .router_hints import read_router
from .screen import ExpertRows, screen_y
from .stacked_experts import gated_activation, stacked_layouts
from .structure import Structure, discover, meta_or_none, output_norms
from .token_table import ignores_tokens, probe_table, tables
from .unread import experts_without_router, unsupported_parts
from .trace import trace_partial

MAX_SCREENS = 4000
_SCREEN_INPUT = 2          # 48 random tokens


def lift(module: nn.Module) -> Union[LiftedMoE, NotLifted, None]:
    """Recognise ``module`` as an MoE layer. Never raises: a crash in analysis is a `NotLifted`."""
    try:
        with Coverage(module) as cov, hooks_off(module):
            got = _lift(module)
        if isinstance(got, LiftedMoE):
            why = unaccounted(cov)
            if why:
                return NotLifted(f"{type(module).__name__}: the kernels would drop code of its forward: {why}")
            with hooks_off(module):
                got.observed_calls = router_calls(module, got.observed, got.spec.hidden, got.token_ids)
            got.idle_experts = idle_expert_grads(module, got, module.training)
            if got.token_ids is None and token_id_args(module):
                ref = got.weights(got.param_tensors(module)).w_up       # (the input's dtype and device)
                for shape in ((2, 5, got.spec.hidden), (10, got.spec.hidden)):
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(23)).to(ref)
                    ignored = ignores_tokens(module, x)
                    if ignored:
                        got.ignored_args = (ignored,)
                        break
        return got
    except Exception as e:  # noqa: BLE001
        return NotLifted(f"{type(module).__name__}: analysis failed: {type(e).__name__}: {e}")


_EXPERT_FIELDS = ("w_up", "w_down", "w_gate", "shared_up", "shared_down", "shared_gate")


def _observed(module: nn.Module, paths, recipe: WeightsRecipe) -> tuple:
    """The child module holding the router weight, when it holds no expert weights (so it is the
    router alone): the compiled forward calls it when it has forward hooks (`LiftedMoE.observed`)."""
    fields = dict(recipe.fields)
    if "w_router" not in fields:        # an external router: the compiled forward calls it anyway
        return ()
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
        fail = f"{cls}: the {ad.name} adapter's reading does not reproduce the module's forward: {msg}"
        confirmed = next((m for m in (module.training, not module.training) if probe(module, got, m) is None), None)
        if confirmed is None:
            return NotLifted(fail)
    dtype = str(got.param_tensors(module)[-1].dtype).replace("torch.", "")
    got.notes = [f"read by the {ad.name} adapter"] + list(got.notes) + [
        f"router: {config_text(got.spec.router)}",
        *("weights: " + line for line in got.weights.describe(got.param_tensors.paths)),
        f"probe: eager forward matched moec.reference.moe for T={', '.join(map(str, TOKENS))} "
        f"(the last leaning on one expert) in training and eval mode ({dtype})"]
    return _eager_in(got, not confirmed, msg) if msg else got


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
    extra = [a for a in extra_required_args(module) if a not in token_id_args(module)[:1]]   # (token ids: a table?)
    if extra:
        return NotLifted(f"{cls}: forward takes extra required argument(s) {', '.join(map(repr, extra))}; "
                         f"moec lifts layers called as forward(hidden_states)")
    inside = inside_a_bigger_layer(module, st)
    if inside:
        return NotLifted(f"{cls}: {inside}")
    if st.expert_biases:
        return NotLifted(f"{cls}: per-expert biases {', '.join(st.expert_biases)} are not supported "
                         f"(MoESpec experts are bias-free)")
    notes = [st.describe()]

    # the forward, traced as far as fx goes
    leaves = [module.get_submodule(p) for p in st.expert_paths + st.shared + st.router_modules]
    router_modules = {r.module for r in st.routers + st.noises if r.module} | set(st.router_modules)
    router_params = {r.weight for r in st.routers}
    cap = trace_partial(module, leaves)
    # the router's choices: the experts, and identity experts after them
    width = st.routers[0].width(st.E) if st.routers else st.E
    hints = read_router(cap, width, router_modules, router_params, st.shapes)
    if st.noises and not hints.noisy and not module.training:   # noise is usually added in training only
        in_training = read_router(trace_partial(module, leaves, training=True), width, router_modules,
                                  router_params, st.shapes)
        if in_training.found:
            hints = in_training
    # a softplus module the trace does not enter (a score function held as a child, DeepSeek-V4's)
    hints.softplus = hints.softplus or any("softplus" in type(m).__name__.lower() for m in module.modules())
    notes.append(cap.describe_stop())
    notes.append(hints.summary())

    # experts
    if st.experts is not None:
        layout = list_layout(module, st)
        if isinstance(layout, str):
            return NotLifted(f"{cls}: {layout}")
        layouts = [layout]
    else:
        layouts = stacked_layouts(st, hints.activations, gated_activation(module, st))
        if not layouts:
            shapes = ", ".join(f"{p} {list(s)}" for p, s in st.stacked)
            return NotLifted(f"{cls}: stacked expert parameters {shapes} do not form gate/up/down projections "
                             f"of hidden size {st.d}")
    formulation, how = read_formulation(st, cap, router_modules | router_params)
    notes.append(f"formulation: {formulation} ({how})")
    # the routing weights scale what the experts read (Llama4): candidates with input-scaled experts first
    scaled_node = scaled_expert_input(cap, st, router_modules | router_params)
    scalings = (True, False) if scaled_node else (False,)

    pr = Prober(module, st.d, width, st.dtype, st.device)
    pr.capacity_named = capacity_options(st) != [{}]
    msg = pr.setup()
    for cand in tables(module) if msg else []:     # the forward fails without token ids: a table it routes by?
        pr.tokens, pr.table = cand, probe_table(module, cand, st.E)
        if pr.setup() is None:
            msg = None
            notes.append(cand.describe())
            break
        pr.tokens = pr.table = None
    if msg:
        msg = scaled_input_reason(scaled_node) + msg
        ids = token_id_args(module)
        if ids:                          # the forward fails without them, and with them under no table of the layer
            msg = (f"its forward needs {ids[0]}, and no integer [vocab, k] or [vocab] tensor of the layer is a table "
                   f"its routing looks them up in (routing by token id moec lifts: experts = table[{ids[0]}]); "
                   f"without them: {msg}")
        return NotLifted(f"{cls}: {msg}")
    aux_out = any("aux" in slots(o) for o in pr.options)
    why: list = []
    if st.routers:                      # (an external router's probe inputs are not skewed: no weight to lean on)
        r0 = st.routers[0]
        w0 = resolve(module, r0.weight)
        pr.set_skew(w0 if r0.layout == "out_in" else w0.t())

    tried = 0
    first_fail = None
    x_screen = pr.x(_SCREEN_INPUT).reshape(-1, st.d)
    screen_shape = pr.x(_SCREEN_INPUT).shape
    xf = x_screen.float()
    noise_dtypes = dedupe([st.dtype, torch.float32])
    # how the forward calls each child that may run as it is (an external router or shared expert): one that it
    # does not call exactly once, with gradients and with arguments moec can repeat, is none
    calls = {}
    for path in st.router_modules + st.shared:
        calls[path], no = external_call(module, path, pr.x(1), module.training, st.device)
        if no:
            why.append(f"{path} cannot run as its own module: {no}")
    st.router_modules = [p for p in st.router_modules if calls[p] is not None]
    router_opts = router_options(st, hints)
    # a shared expert computes the layer's variant, or plain GLU (`SharedExpertConfig.variant`: HunYuan-V4),
    # each read past the clamps (shared_layout)
    variants = tuple(dict.fromkeys([lay.variant for lay in layouts] + [()]))
    shared = {p: shared_layout(module, p, st, variants) for p in st.shared}

    def prepared(screen: bool):
        """Per expert layout: its part, its shared-expert options and its experts' rows on the screen input."""
        for layout in layouts:
            with torch.no_grad():
                experts = ExpertRows(xf, layout.build([resolve(module, p) for p in layout.paths]), layout, st.E)
            yield layout, Part(layout.paths, layout.fields, layout.desc), \
                shared_options(shared, st, layout, why, [p for p in st.shared if calls[p] is not None]), experts

    def readings(layout, exp_part, sh_opt, r_opt, screen: bool) -> tuple:
        """The weights one reading of the module gives, per expert-norm option (none first), and the shared
        expert's rows on the screen input (None: an external shared expert that fails on it: no reading)."""
        (sh_part, sh_cfg, sh_called), (r_part, called) = sh_opt, (r_opt[0], r_opt[5])
        out = []
        for n_part, n_eps in norm_options(st):
            parts = [r_part, exp_part] + ([sh_part] if sh_part else []) + ([n_part] if n_part else [])
            param_tensors, recipe = assemble(parts)
            with torch.no_grad():
                w = with_children(recipe(param_tensors(module)), module, called, sh_called, calls, screen,
                                  probe_seed(_SCREEN_INPUT), screen_shape)
            out.append((parts, param_tensors, recipe, w, n_eps))
        with torch.no_grad():
            try:
                S = w.shared(x_screen).float() if sh_called is not None else None
            except Exception as e:  # noqa: BLE001 - a candidate child that cannot take the input is no reading
                why.append(f"shared expert {sh_called} as its own module: {type(e).__name__}: {e}")
                return [], None
            if sh_cfg is not None:
                own = sh_cfg.variant if sh_cfg.variant is not None else layout.variant
                S = reference.expert_mlp(xf, w.shared_up, w.shared_down, w.shared_gate if layout.glu else None,
                                         layout.activation, variant=dict(own))
                if sh_cfg.gated:
                    S = S * torch.sigmoid(xf @ w.shared_gate_proj.float().t())
        return out, S

    def confirmed(screen: bool):
        """Configurations whose screen (on one input, in the ``screen`` training mode) and full probe in that
        mode pass, most plausible first, each with the other mode's probe result (None: it passes too). The
        router configuration leads the search: each is tried with every expert layout (the activation a trace
        cut at the first data-dependent step could not read), shared expert and norm reading before the next."""
        nonlocal tried, first_fail
        layouts_ = list(prepared(screen))
        cache: dict = {}
        for ri, r_opt in enumerate(router_opts):
            _, has_bias, has_noise, router_bias, r_width, called = r_opt
            for cfg, scaled in ((c, sc) for sc in scalings for c in token_configs(router_configs(
                    st, hints, aux_out, router_bias, has_bias, has_noise, r_width), pr.tokens)):
                for li, (layout, exp_part, shared_opts, experts) in enumerate(layouts_):
                    for si, sh_opt in enumerate(shared_opts):
                        if (ri, li, si) not in cache:
                            cache[ri, li, si] = readings(layout, exp_part, sh_opt, r_opt, screen)
                        reads, S = cache[ri, li, si]
                        sh_part, sh_cfg, sh_called = sh_opt
                        for parts, param_tensors, recipe, w, n_eps in reads:
                            try:
                                spec = MoESpec(hidden=st.d, ffn=layout.ffn, router=cfg, activation=layout.activation,
                                               glu=layout.glu, shared=sh_cfg, expert_bias=layout.bias,
                                               identity_experts=r_width - st.E, input_scaled=scaled,
                                               external_router=called is not None, expert_norm=n_eps,
                                               **dict(layout.variant))
                            except MoESpecError:
                                continue
                            for nd in (noise_dtypes if cfg.noisy else [None]):
                                tried += 1
                                if tried > MAX_SCREENS:
                                    return
                                with torch.no_grad():
                                    noise = pr.noise(_SCREEN_INPUT, nd) if (screen and cfg.noisy) else None
                                    # (the precomputed expert rows are of unscaled, unnormalised outputs:
                                    # input-scaled and normalised experts are screened by the reference itself)
                                    try:
                                        y_ref, aux = (None, None) if scaled or n_eps is not None else \
                                            screen_y(xf, w, cfg, experts, S, noise, pr.group(_SCREEN_INPUT), x_screen,
                                                     pr.choices(_SCREEN_INPUT))
                                    except Exception:  # noqa: BLE001 - an external router failing on the input
                                        y_ref, aux = None, None     # (the probe's comparison names the error)
                                    outputs, msg = pr.match(_SCREEN_INPUT, screen, spec, w, nd, y_ref=y_ref, aux=aux)
                                if msg:
                                    if first_fail is None:
                                        first_fail = f"{config_text(cfg)}: {msg}"
                                    continue
                                lifted = LiftedMoE(spec=spec, formulation=formulation, param_tensors=param_tensors,
                                                   weights=recipe, outputs=outputs, container=pr.container,
                                                   out_dtypes=pr.out_dtypes, out_leads=pr.out_leads,
                                                   y_flat=pr.y_flat, noise_dtype=(nd or st.dtype) if cfg.noisy else None,
                                                   notes=list(notes),
                                                   observed=_observed(module, param_tensors.paths, recipe),
                                                   post=pr.post_path, router_module=called, shared_module=sh_called,
                                                   external_calls={p: calls[p] for p in (called, sh_called) if p},
                                                   token_ids=pr.tokens)
                                msg = pr.check(lifted, screen)
                                if msg:
                                    if first_fail is None or first_fail.startswith(config_text(cfg)):
                                        first_fail = f"{config_text(cfg)}: {msg}"
                                    continue
                                _finish_notes(lifted, parts, layout, sh_part, cfg, st)
                                if pr.post is not None:
                                    lifted.notes.append(f"output norm: {pr.post_path} ({type(pr.post).__name__}) "
                                                        f"applied to the combined output, as torch code after the "
                                                        f"kernels")
                                yield lifted, pr.check(lifted, not screen)

    # a configuration confirmed in both modes, else one confirmed in the current mode, else in the other;
    # with a norm of the layer's output (a child the forward applies last) first, when the module has one
    training = module.training
    for post in output_norms(module, st) + [None]:
        pr.post, pr.post_path = (module.get_submodule(post), post) if post else (None, None)
        tried = 0
        partial = None
        for lifted, other in confirmed(training):
            if other is None:
                return lifted
            partial = partial or _eager_in(lifted, not training, other)
        if partial is None and tried <= MAX_SCREENS:
            partial = next((_eager_in(lifted, training, other) for lifted, other in confirmed(not training)), None)
        if partial is not None:
            return partial
    # the first feature it lacks, in words, before the probe's details
    lacks = unsupported_parts(module, st) + scaled_input_reason(scaled_node)
    if tried > MAX_SCREENS:
        reason = f"{cls}: {lacks}no configuration found within {MAX_SCREENS} candidates"
        reason += f"; first candidate ({first_fail})" if first_fail else ""
    else:
        reason = f"{cls}: {lacks}no candidate configuration reproduces the module's forward ({tried} tried"
        reason += f"; the most plausible, {first_fail})" if first_fail else ")"
    if why:             # what the parts' readings found (a shared expert of another GLU, ...)
        reason += "; " + "; ".join(why)
    return NotLifted(reason)


def _eager_in(lifted: LiftedMoE, training: bool, reason: str) -> LiftedMoE:
    """``lifted`` for the other mode only: calls in ``training`` mode run eager, for ``reason``."""
    lifted.eager_in = {training: reason}
    lifted.notes = [n.replace("in training and eval mode", f"in {mode_name(not training)} mode") for n in lifted.notes]
    lifted.notes.append(f"{mode_name(training)} mode runs eager: the probe could not confirm it ({reason})")
    return lifted


def _finish_notes(lifted: LiftedMoE, parts, layout: ExpertLayout, sh_part, cfg, st: Structure) -> None:
    n = lifted.notes
    if lifted.router_module is not None:    # the structure's line named the most plausible router: say which one
        n[0] = st.describe(parts[0].desc)
    n.append(f"experts: {layout.desc}" + (" (verified by calling each expert)" if layout.verified
                                         else " (reading chosen by the probe)"))
    n.append(parts[0].desc)
    if sh_part is not None:
        n.append(sh_part.desc)
    n.extend(p.desc for p in parts[2:] if p is not sh_part)        # expert norms
    n.append(f"router: {config_text(cfg)}")
    if cfg.noisy:
        n.append(f"noisy gating: training-mode noise drawn as randn([T, E]) in {lifted.noise_dtype}")
    n.extend("weights: " + line for line in lifted.weights.describe(lifted.param_tensors.paths))
    n.append(f"probe: eager forward matched moec.reference.moe for T={', '.join(map(str, TOKENS))} "
             f"(the last leaning on one expert) in training and eval mode ({str(st.dtype).replace('torch.', '')})")


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


def unread_moe_modules(model: nn.Module, found: list) -> list:
    """``[(qualified name, module, reason)]`` for modules that hold experts but are no candidate of
    `find_moe_modules` (``found``), outside of those: what `explain()` says about them."""
    taken = {q for q, _ in found}
    out: list = []

    def visit(prefix: str, m: nn.Module) -> None:
        if prefix in taken:
            return
        try:
            why = experts_without_router(m)
        except Exception:  # noqa: BLE001 - an odd module is simply not reported
            why = None
        if why:
            out.append((prefix, m, f"{type(m).__name__}: {why}"))
            return
        for name, child in m.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out
