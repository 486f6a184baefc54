"""Experts: which tensors play gate/up/down, and which activation, for each way experts are stored.

- A ModuleList of MLPs: each expert's forward is fx-traceable on its own, so `read_expert` gives
  the roles and activation; the expert modules are then *called* on random rows and compared with
  `moec.reference.expert_mlp`, so a misread is caught here, per expert. If the trace is not
  understood, the few role/activation assignments the linears' shapes allow are tried the same way.
- Stacked 3-D parameters: `moec.frontend.stacked_experts` (every reading the shapes allow, for the probe).
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .. import reference
from ..spec import ACTIVATIONS
from .adapters import known_activation
from .fx_ops import ACTIVATION_OPS, CASTS, int_arg, strip
from .lifted import Src
from .linears import linears
from .probe_harness import draw, mismatch, run
from .structure import Structure
from .trace import Traced, trace_partial

GATE_WORDS = ("gate", "w1", "wi_0")
UP_WORDS = ("up", "w3", "wi_1", "w_in", "fc1", "wi")
DOWN_WORDS = ("down", "w2", "wo", "w_out", "out", "fc2")
FUSED_WORDS = ("gate_up", "w13", "w1_3", "gateup")


# ---- reading one expert MLP off its own fx graph ---------------------------------------------

@dataclass
class ExpertRead:
    """An expert MLP read off its own fx graph. Roles name linear submodules; ``*_part`` is
    ``(i, n)`` for the i-th of n equal chunks of that linear's output, or None."""

    glu: bool
    activation: str
    up: str
    down: str
    gate: Optional[str] = None
    up_part: Optional[tuple] = None
    gate_part: Optional[tuple] = None


_PASS = CASTS | {"identity", "dropout"}      # an expert is read (and verified) in eval mode


def _strip(cap: Traced, n):
    return strip(n, _PASS, cap.root)


def _linear_src(cap: Traced, n):
    """``(linear path, part)`` when ``n`` is a linear's output or one chunk of it."""
    n = _strip(cap, n)
    if not isinstance(n, fx.Node):
        return None
    if cap.kind(n) == "linear" and n.op == "call_module":
        return n.target, None
    if cap.kind(n) == "getitem" and isinstance(n.args[1], int):
        c = n.args[0]
        if isinstance(c, fx.Node) and cap.kind(c) == "chunk":
            src = _strip(cap, c.args[0])
            parts = int_arg(c, 1, "chunks")
            dim = c.args[2] if len(c.args) > 2 else c.kwargs.get("dim", 0)
            if isinstance(src, fx.Node) and src.op == "call_module" and cap.kind(src) == "linear" and parts and dim in (-1,):
                return src.target, (n.args[1], parts)
    return None


def _activation(cap: Traced, n):
    """``(activation kind, input)`` when ``n`` applies an elementwise activation."""
    n = _strip(cap, n)
    if not isinstance(n, fx.Node):
        return None
    k = cap.kind(n)
    if k in ACTIVATION_OPS or k == "sigmoid":
        return k, n.args[0]
    if k == "mul" and len(n.args) == 2:       # x * sigmoid(x) is silu
        a, b = n.args
        for p, q in ((a, b), (b, a)):
            if isinstance(q, fx.Node) and cap.kind(q) == "sigmoid" and q.args[0] is p:
                return "silu", p
    return None


def read_expert(expert: nn.Module):
    """Read an expert MLP's roles and activation from its own fx graph.

    Returns an `ExpertRead`, a string naming an unsupported construct, or None (not understood).
    """
    cap = trace_partial(expert)
    if not cap.complete:
        return None
    outs = [n for n in cap.graph.nodes if n.op == "output"]
    if not outs:
        return None
    res = _strip(cap, outs[0].args[0])
    if not isinstance(res, fx.Node) or not (res.op == "call_module" and cap.kind(res) == "linear"):
        return None
    down = res.target
    h = _strip(cap, res.args[0])
    act = _activation(cap, h)
    if act is not None and _linear_src(cap, act[1]) is not None:
        up = _linear_src(cap, act[1])
        return _expert_or_reason(act[0], False, up, None, down, h)
    if isinstance(h, fx.Node) and cap.kind(h) == "mul" and len(h.args) == 2:
        a, b = h.args
        for p, q in ((a, b), (b, a)):
            act = _activation(cap, p)
            if act is None:
                continue
            gate, up = _linear_src(cap, act[1]), _linear_src(cap, q)
            if gate is not None and up is not None:
                return _expert_or_reason(act[0], True, up, gate, down, p)
    return None


def _expert_or_reason(kind, glu, up, gate, down, node):
    if kind not in ACTIVATIONS:
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"activation {kind} ({what}) is not supported (moec supports {', '.join(ACTIVATIONS)})"
    return ExpertRead(glu=glu, activation=kind, up=up[0], up_part=up[1], down=down,
                      gate=gate[0] if gate else None, gate_part=gate[1] if gate else None)


# ---- layouts ----------------------------------------------------------------------------------

@dataclass
class ExpertLayout:
    """How to read the experts' weights: ``paths`` are leaf tensors, ``fields`` build
    ``w_up``/``w_down``/``w_gate`` from them (indices into ``paths``)."""

    glu: bool
    activation: str
    ffn: int
    paths: list
    fields: list
    desc: str
    verified: bool = False
    score: int = 0
    bias: bool = False          # b_up/b_down(/b_gate) fields: every expert projection adds a bias
    variant: tuple = ()         # the GLU variant's items (`moec.spec.MoESpec`), from a gated activation module

    def build(self, tensors) -> dict:
        return {name: src.build(tensors) for name, src in self.fields}


@dataclass(frozen=True)
class _Form:
    """One expert MLP in terms of its linear submodules (relative names)."""

    glu: bool
    activation: str
    up: str
    down: str
    gate: Optional[str] = None
    up_rows: Optional[tuple] = None
    gate_rows: Optional[tuple] = None
    bias: bool = False          # every projection adds a bias
    variant: tuple = ()         # the GLU variant's items (`moec.spec.MoESpec`)


def _rows(part, f2: int):
    """Chunk ``(i, n)`` of a weight with ``f2`` output rows -> ``(start, stop, 1)``."""
    if part is None:
        return None
    i, n = part
    size = f2 // n
    return (i * size, (i + 1) * size, 1)


def _form_from_read(expert: nn.Module, r: ExpertRead) -> _Form:
    out_of = lambda name: expert.get_submodule(name).weight.shape[0]  # noqa: E731
    return _Form(r.glu, r.activation, r.up, r.down, r.gate,
                 _rows(r.up_part, out_of(r.up)), _rows(r.gate_part, out_of(r.gate)) if r.gate else None)


def _enumerate_forms(expert: nn.Module, d: int) -> list:
    lins = [(n, lin) for n, _, lin in linears(expert)]
    downs = [(n, m) for n, m in lins if m.out_features == d]
    ins = [(n, m) for n, m in lins if m.in_features == d]
    forms = []
    for dn, dm in downs:
        f = dm.in_features
        rest = [(n, m) for n, m in ins if n != dn]
        if len(rest) == 2 and all(m.out_features == f for _, m in rest):
            (a, _), (b, _) = rest
            if name_score(b, GATE_WORDS) > name_score(a, GATE_WORDS):
                a, b = b, a
            for act in ACTIVATIONS:
                forms += [_Form(True, act, b, dn, a), _Form(True, act, a, dn, b)]
        elif len(rest) == 1 and rest[0][1].out_features == 2 * f:
            n = rest[0][0]
            for act in ACTIVATIONS:
                forms += [_Form(True, act, n, dn, n, (f, 2 * f, 1), (0, f, 1)),
                          _Form(True, act, n, dn, n, (0, f, 1), (f, 2 * f, 1)),
                          _Form(True, act, n, dn, n, (1, 2 * f, 2), (0, 2 * f, 2))]
        elif len(rest) == 1 and rest[0][1].out_features == f:
            forms += [_Form(False, act, rest[0][0], dn) for act in ("relu", "gelu", "gelu_tanh", "silu", "relu2")]
    return forms


def name_score(name: str, words) -> int:
    leaf = name.lower().split(".")[-1]
    return sum(w in leaf for w in words)


def _form_weights(expert: nn.Module, form: _Form, what: str = "weight"):
    def w(name, rows):
        t = getattr(expert.get_submodule(name), what)
        return t if rows is None else t[slice(*rows)]
    return (w(form.up, form.up_rows), getattr(expert.get_submodule(form.down), what),
            w(form.gate, form.gate_rows) if form.glu else None)


def _form_biases(expert: nn.Module, form: _Form) -> tuple:
    """``(b_gate, b_up, b_down)`` of one expert (Nones for a bias-free form)."""
    if not form.bias:
        return None, None, None
    up, down, gate = _form_weights(expert, form, "bias")
    return gate, up, down


def verify_form(modules: list, form: _Form, d: int, dtype, device, reach: float = 0.0) -> bool:
    """Call each expert module (in eval mode) on random rows and compare with `reference.expert_mlp`; with
    ``reach``, also on rows scaled so that the gate and up projections reach it (past every clamp or softcap
    a candidate variant has: a form that differs only there is told apart)."""
    x = draw((6, d), 7, dtype, device)
    try:
        with torch.no_grad():
            for m in modules:
                up, down, gate = _form_weights(m, form)
                rows = [x]
                if reach:
                    widest = max(float((x.float() @ w.float().t()).abs().max()) for w in (up, gate) if w is not None)
                    rows.append((x.float() * (reach / max(widest, 1e-6))).to(dtype))
                for xs in rows:
                    y = run(m, (xs,), m, False, xs.device, 0)
                    ref = reference.expert_mlp(xs.float(), up, down, gate, form.activation,
                                               variant=dict(form.variant), biases=_form_biases(m, form))
                    if not isinstance(y, torch.Tensor) or y.shape != ref.shape or mismatch(y, ref, dtype):
                        return False
    except Exception:  # noqa: BLE001 - a form that cannot even run is simply not this expert
        return False
    return True


def _reach(variants) -> float:
    """Three times the largest clamp or softcap of ``variants`` (items), 0.0 when none has one."""
    caps = [v for variant in variants for k, v in variant if k in ("glu_limit", "gate_softcap", "up_softcap")]
    return 3.0 * max(caps) if caps else 0.0


def _bias_reason(paths: list, mods: list, allow: bool) -> Optional[str]:
    """Why the linears' biases rule the experts out (None: all linears have one, or none has)."""
    have = [(f"{p}.{n}", lin.bias is not None) for p, m in zip(paths, mods)
            for n, _, lin in linears(m)]
    biased = [q for q, b in have if b]
    if not biased:
        return None
    if not allow:
        return f"linear {biased[0]} has a bias; a shared expert's linears must be bias-free"
    if len(biased) != len(have):
        plain = next(q for q, b in have if not b)
        return f"linear {biased[0]} has a bias but {plain} has none; expert linears need a bias on all or none"
    return None


def analyse_mlp(module: nn.Module, paths: list, d: int, dtype, device, biases: bool = True, variants=((),)):
    """The verified `_Form` shared by the MLP modules at ``paths`` or a reason string; ``biases``:
    whether linears with biases are allowed (routed experts) or not (a shared expert); ``variants``: the
    GLU variants (items) a gated form may compute, tried in order."""
    mods = [module.get_submodule(p) for p in paths]
    why = _bias_reason(paths, mods, biases)
    if why:
        return why
    bias = any(lin.bias is not None for _, _, lin in linears(mods[0]))
    shapes0 = [(n, tuple(t.shape)) for n, t in mods[0].named_parameters()]
    for p, m in zip(paths[1:], mods[1:]):
        if [(n, tuple(t.shape)) for n, t in m.named_parameters()] != shapes0:
            return f"{p} has different parameters from {paths[0]}"
    read = read_expert(mods[0])
    if isinstance(read, str):
        return f"{paths[0]}: {read}"
    forms = [_form_from_read(mods[0], read)] if read is not None else []
    forms += [f for f in _enumerate_forms(mods[0], d) if f not in forms]
    forms = [dataclasses.replace(f, bias=bias, variant=v) for f in forms for v in (variants if f.glu else ((),))]
    reach = _reach(variants)
    for form in forms:
        if verify_form(mods[:1], form, d, dtype, device, reach) and verify_form(mods, form, d, dtype, device, reach):
            return form
    how = "its fx graph was read but" if read is not None else "its forward could not be read and"
    act = getattr(mods[0], "act_fn", None)
    own = (f"it applies an expert activation of its own, {type(act).__name__} ({paths[0]}.act_fn), which moec "
           f"does not support; " if isinstance(act, nn.Module) and not known_activation(act) else "")
    return (f"{own}{paths[0]} ({type(mods[0]).__name__}): {how} no assignment of its linears to "
            f"down(act(gate(x)) * up(x)) or down(act(up(x))) with act in {ACTIVATIONS} reproduces it")


def _layout_from_form(paths: list, form: _Form, module: nn.Module) -> ExpertLayout:
    leaf: dict = {}

    def idx(p):
        return leaf.setdefault(p, len(leaf))

    up = [idx(f"{p}.{form.up}.weight") for p in paths]
    gate = [idx(f"{p}.{form.gate}.weight") for p in paths] if form.glu else None
    down = [idx(f"{p}.{form.down}.weight") for p in paths]
    fields = [("w_up", Src(tuple(up), stack=True, rows=form.up_rows)),
              ("w_down", Src(tuple(down), stack=True))]
    if form.glu:
        fields.append(("w_gate", Src(tuple(gate), stack=True, rows=form.gate_rows)))
    if form.bias:           # [E, rows] stacks: a fused projection's rows are the biases' columns
        fields += [("b_up", Src(tuple(idx(f"{p}.{form.up}.bias") for p in paths), stack=True, cols=form.up_rows)),
                   ("b_down", Src(tuple(idx(f"{p}.{form.down}.bias") for p in paths), stack=True))]
        if form.glu:
            fields.append(("b_gate", Src(tuple(idx(f"{p}.{form.gate}.bias") for p in paths), stack=True,
                                         cols=form.gate_rows)))
    f = module.get_submodule(f"{paths[0]}.{form.down}").weight.shape[1]
    rows = lambda r: "" if r is None else f"[{r[0]}:{r[1]}" + (f":{r[2]}" if r[2] != 1 else "") + "]"  # noqa: E731
    desc = (f"gate={form.gate}{rows(form.gate_rows)}, up={form.up}{rows(form.up_rows)}, down={form.down}, "
            f"{form.activation}" if form.glu else f"up={form.up}, down={form.down}, {form.activation}")
    desc += ", with biases" if form.bias else ""
    if form.variant:
        desc = desc.replace(f", {form.activation}", f", {act_text(form.activation, form.variant)}", 1)
    return ExpertLayout(form.glu, form.activation, f, list(leaf), fields, desc, verified=True, bias=form.bias,
                        variant=form.variant)


def list_layout(module: nn.Module, st: Structure):
    """The verified layout of ModuleList experts, or a reason string."""
    form = analyse_mlp(module, st.expert_paths, st.d, st.dtype, st.device)
    if isinstance(form, str):
        return form
    return _layout_from_form(st.expert_paths, form, module)


def shared_layout(module: nn.Module, path: str, st: Structure, variants=((),)):
    """A shared expert (one MLP module) as plain ``[f, d]`` weights, or a reason string; ``variants``: the GLU
    variants it may compute (the routed experts': `MoESpec` has one)."""
    form = analyse_mlp(module, [path], st.d, st.dtype, st.device, biases=False, variants=variants)
    if isinstance(form, str):
        return form
    lay = _layout_from_form([path], form, module)
    fields = [(name.replace("w_", "shared_"), Src(src.indices, rows=src.rows)) for name, src in lay.fields]
    return ExpertLayout(lay.glu, lay.activation, lay.ffn, lay.paths, fields, lay.desc, verified=True,
                        variant=form.variant)


def act_text(activation: str, variant: tuple) -> str:
    return activation + (f" ({', '.join(f'{k}={v:g}' for k, v in variant)})" if variant else "")
