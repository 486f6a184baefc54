"""Stacked 3-D expert parameters: which tensors play gate/up/down, and which activation.

There is no standalone expert to call, so every assignment the shapes allow (which tensor is down, gate/up order
or the halves of a fused ``[E, d, 2f]``, ``[E, in, out]`` vs ``[E, out, in]`` layout, activation) becomes a
candidate `ExpertLayout`, best-named first; the layer probe decides among them. A gated activation module the
experts' owner holds (``act(gate, up)``, or transformers' custom ``_apply_gate``) is read by evaluating it.
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

from ..spec import ACTIVATIONS
from .adapters import gate_method_form, gated_form
from .experts import DOWN_WORDS, FUSED_WORDS, GATE_WORDS, UP_WORDS, ExpertLayout, act_text, name_score
from .lifted import Src
from .structure import Structure


def gated_activation(module: nn.Module, st: Structure) -> Optional[tuple]:
    """``(activation, GLU variant)`` of the gated activation module ``act(gate, up)`` the stacked experts'
    module holds (Inkling2's softcapped SwiGLU), read by evaluating it (`adapters.gated_form`); None
    when it holds none, or one that computes no form of moec's."""
    owners = dict.fromkeys(path.rpartition(".")[0] for path, _ in st.stacked)
    for owner in owners:
        m = module.get_submodule(owner)
        for child in m.children():
            if next(child.parameters(), None) is None and _takes_two(child):
                form = gated_form(child)
                if form is not None:
                    return form
        gate = getattr(type(m), "_apply_gate", None)
        if callable(gate):          # transformers' experts with a custom gate (MiniMax-M3: clamped SwiGLU)
            widths = {s // 2 for _, shape in st.stacked for s in shape[1:] if s != st.d and s % 2 == 0}
            for f in sorted(widths):
                form = gate_method_form(m, f)
                if form is not None:
                    return form[1:]
    return None


def _takes_two(m: nn.Module) -> bool:
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return len([p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) == 2


def stacked_layouts(st: Structure, activations_hint: list, gated: Optional[tuple] = None) -> list:
    """Every reading of stacked 3-D expert weights that the shapes allow, best-named first. ``gated``:
    the experts' gated activation (`gated_activation`): GLU readings then compute exactly that."""
    d = st.d
    params = st.stacked

    def as_down(shape):   # [E, a, b] projecting X -> d: (X, transpose to [E, d, X])
        _, a, b = shape
        out = []
        if a == d:
            out.append((b, False))      # [E, d, X] nn.Linear layout
        if b == d:
            out.append((a, True))       # [E, X, d] used as h @ W
        return out

    def as_in(shape):     # [E, a, b] projecting d -> X: (X, transpose to [E, X, d])
        _, a, b = shape
        out = []
        if a == d:
            out.append((b, True))       # [E, d, X] used as x @ W
        if b == d:
            out.append((a, False))      # [E, X, d] nn.Linear layout
        return out

    hinted = [a for a in activations_hint if a in ACTIVATIONS]
    glu_acts = hinted + [a for a in ("silu", "gelu_tanh", "gelu", "relu", "relu2") if a not in hinted]
    variant = ()
    if gated is not None:
        glu_acts, variant = [gated[0]], tuple(sorted(gated[1].items()))
    plain_acts = hinted + [a for a in ("relu", "gelu", "gelu_tanh", "silu", "relu2") if a not in hinted]
    paths = [p for p, _ in params]
    out = []
    for di, (dpath, dshape) in enumerate(params):
        rest = [i for i in range(len(params)) if i != di]
        for f, dt in as_down(dshape):
            down = ("w_down", Src((di,), transpose=dt))
            base = 2 * name_score(dpath, DOWN_WORDS)
            if len(rest) == 1:
                ri = rest[0]
                rpath = params[ri][0]
                for X, rt in as_in(params[ri][1]):
                    cons = 1 if rt == dt else 0
                    if X == f:
                        for a in plain_acts:
                            out.append(ExpertLayout(False, a, f, paths, [("w_up", Src((ri,), transpose=rt)), down],
                                                    f"up={rpath}{'.mT' if rt else ''}, down={dpath}{'.mT' if dt else ''}, {a}",
                                                    score=base + cons + name_score(rpath, UP_WORDS)))
                    elif X == 2 * f:
                        fused = name_score(rpath, FUSED_WORDS) + name_score(rpath, GATE_WORDS)
                        splits = (("gate first", (0, f, 1), (f, 2 * f, 1), 1),
                                  ("up first", (f, 2 * f, 1), (0, f, 1), 0),
                                  ("interleaved", (0, 2 * f, 2), (1, 2 * f, 2), 0))
                        for a in glu_acts:
                            for sname, grows, urows, pref in splits:
                                out.append(ExpertLayout(
                                    True, a, f, paths,
                                    [("w_gate", Src((ri,), transpose=rt, rows=grows)),
                                     ("w_up", Src((ri,), transpose=rt, rows=urows)), down],
                                    f"gate,up={rpath}{'.mT' if rt else ''} ({sname}), down={dpath}{'.mT' if dt else ''}, "
                                    f"{act_text(a, variant)}", score=base + cons + fused + pref, variant=variant))
            elif len(rest) == 2:
                (gi, ui) = rest
                for gX, gt in as_in(params[gi][1]):
                    for uX, ut in as_in(params[ui][1]):
                        if gX != f or uX != f:
                            continue
                        cons = (gt == dt) + (ut == dt)
                        for a in glu_acts:
                            for g_, u_, gt_, ut_ in ((gi, ui, gt, ut), (ui, gi, ut, gt)):
                                gp, up_ = params[g_][0], params[u_][0]
                                out.append(ExpertLayout(
                                    True, a, f, paths,
                                    [("w_gate", Src((g_,), transpose=gt_)), ("w_up", Src((u_,), transpose=ut_)), down],
                                    f"gate={gp}{'.mT' if gt_ else ''}, up={up_}{'.mT' if ut_ else ''}, "
                                    f"down={dpath}{'.mT' if dt else ''}, {act_text(a, variant)}",
                                    score=base + cons + 2 * name_score(gp, GATE_WORDS) + 2 * name_score(up_, UP_WORDS),
                                    variant=variant))
    # best names first; stable, so activations stay in hint order within a reading
    order = {id(l): i for i, l in enumerate(out)}
    out.sort(key=lambda l: (-l.score, order[id(l)]))
    return out
