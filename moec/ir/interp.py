"""The reference interpreter: runs any IR graph (before or after any pass) with plain torch.

Each op's semantics is a few lines here, written from its `OpDef` doc and `moec.reference`, so a
pass can be tested numerically (interpret before == interpret after) and not only as text.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import reference as ref
from .graph import Graph, Node
from .ops import glu_variant, router_config
from .tiles import at_bucket
from .types import bind_sizes, binders, condition

_IMPL: dict[str, Callable] = {}


def impl(name):
    def deco(fn):
        _IMPL[name] = fn
        return fn
    return deco


@impl("linear")
def _linear(n, v, ctx):
    return {"out": ref.router_logits(v["x"], v["w"], v.get("b"))}


def _noise(ctx, T, E, device):
    noise = ctx.get("noise")
    if noise is None:
        raise ValueError("a noisy router in training mode needs a noise tensor")
    if tuple(noise.shape) != (T, E):
        raise ValueError(f"noise must have shape {(T, E)}, got {tuple(noise.shape)}")
    return noise.to(device=device, dtype=torch.float32)


@impl("route")
def _route(n, v, ctx):
    cfg = router_config(n.attr)
    logits = v["logits"]
    if cfg.noisy and ctx.get("training"):
        noise = _noise(ctx, *logits.shape, logits.device)
        logits = logits + noise * torch.nn.functional.softplus(v["noise_logits"])
    ids, w, aux = ref.route(logits, cfg, v.get("score_bias"), ctx.get("group_size"), v.get("choices"))
    return {"ids": ids.to(torch.int32), "weights": w, "aux": aux}


@impl("fused_route")
def _fused_route(n, v, ctx):
    cfg = router_config(n.attr)
    noisy = cfg.noisy and ctx.get("training")
    x = v.get("x")
    if x is None:                        # given logits (an external router's)
        logits = v["logits"].float()
    else:
        noise = _noise(ctx, x.shape[0], cfg.num_experts, x.device) if noisy else None
        logits = ref.router_logits(x, v["w"], v.get("b"), v.get("w_noise"), noise)
    ids, w, _ = ref.route(logits, cfg.replace(aux_loss=False, aux_counts="pairs"), v.get("score_bias"),
                          choices=v.get("choices"))
    scores = ref.scores_of(logits, cfg)
    clean = ref.router_logits(x, v["w"], v.get("b")) if noisy else logits
    probs = scores if cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)
    out = {"ids": ids.to(torch.int32), "weights": w, "logits": clean, "prob_sum": probs.sum(0),
           "counts": torch.bincount(ids.reshape(-1), minlength=cfg.num_experts).to(torch.int32)}
    if "w_shared_gate" in n.ins:
        out["shared_scale"] = torch.sigmoid(x.float() @ v["w_shared_gate"].float().t())[:, 0]
    if "order" in n.outs:                 # fuse-dispatch: the pairs grouped by expert too
        out.update(_dispatch(n, {"ids": out["ids"]}, ctx))
    return out


def tile_schedule(offsets, pairs: int, block_m: int):
    """The tile schedule (see the ``dispatch`` op) of ``offsets`` for ``block_m``-row tiles, in fixed-shape
    torch ops; entries past the tile count are -1."""
    off = offsets.long()
    tiles = (off[1:] - off[:-1] + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    total = ends[-1:] if ends.numel() else ends.new_zeros(1)
    i = torch.arange(pairs, device=off.device)
    expert = torch.searchsorted(ends, i, right=True).clamp(max=max(tiles.numel() - 1, 0))
    valid = i < total
    row0 = off[expert] + (i - (ends - tiles)[expert]) * block_m
    parts = [torch.where(valid, v, -1) for v in (expert, row0, off[expert + 1])]
    return torch.cat([total, *parts]).to(torch.int32)


@impl("aux_loss")
def _aux(n, v, ctx):
    return {"out": ref.aux_from_counts(v["counts"], v["prob_sum"], v["ids"], n.attr["num_experts"],
                                       n.attr["first_choice"])}


@impl("apply_capacity")
def _capacity(n, v, ctx):
    cfg = router_config(n.attr)
    scores = ref.scores_of(v["logits"], cfg)
    sel = ref.selection_keys(scores, cfg, v.get("score_bias"), v["logits"])
    ids = v["ids"].long()
    full = scores.gather(1, ids)
    factor = v["weights"][:, :1] / full[:, :1]       # the per-token normalisation applied by route
    ids, w = ref.apply_capacity(ids, v["weights"], scores, sel, factor, cfg, ctx.get("group_size"))
    return {"ids": ids.to(torch.int32), "weights": w}


@impl("identity_experts")
def _identity_experts(n, v, ctx):
    share = ref.identity_share(v["ids"], v["weights"], n.attr["ffn_experts"], n.attr["dropped"])
    return {"ids": torch.where(v["ids"] >= n.attr["ffn_experts"], -1, v["ids"]), "out": v["x"].float() * share}


@impl("shared_gate")
def _shared_gate(n, v, ctx):
    return {"scale": torch.sigmoid(v["x"].float() @ v["w"].float().t())[:, 0]}


@impl("dispatch")
def _dispatch(n, v, ctx):
    E = n.attr["num_experts"]
    flat = v["ids"].reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=E + 1)[:E]
    offsets = torch.zeros(E + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    out = {"order": order.to(torch.int32), "offsets": offsets.to(torch.int32)}
    if "schedule" in n.outs:
        block_m = at_bucket(n.attr["schedule_block_m"], v["ids"].shape[0])
        out["schedule"] = tile_schedule(offsets, flat.shape[0], block_m)
    return out


@impl("permute")
def _permute(n, v, ctx):
    rows = v["x"][v["order"].long() // n.attr["top_k"]]
    if "scale" in v:
        rows = (rows.float() * v["scale"].reshape(-1).float()[v["order"].long()][:, None]).to(rows.dtype)
    return {"out": rows}


@impl("grouped_gemm")
def _grouped_gemm(n, v, ctx):
    a_attr = n.attr
    A = v["a"]
    order = v.get("order")
    if a_attr["gather_top_k"]:
        A = A[order.long() // a_attr["gather_top_k"]]
    rows = A.shape[0]
    out_t = n.types[0]
    out = torch.zeros(rows, out_t.shape[1], dtype=out_t.torch_dtype, device=A.device)
    pre = {r: torch.zeros(rows, out_t.shape[1], dtype=A.dtype, device=A.device) for r in ("pre", "pre_up")
           if r in n.outs}
    offsets = v.get("offsets")
    if offsets is None:
        offsets = torch.tensor([0, rows], device=A.device)
    E = a_attr["num_experts"]
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi <= lo:
            continue
        a = A[lo:hi].float()
        rs = None                       # the rows' scale
        if "scale" in v:
            s = v["scale"].reshape(-1)
            rs = (s[order[lo:hi].long()] if order is not None else s[lo:hi])[:, None]
        if a_attr["scale_in"]:          # (s A_i) @ w
            a = a * rs.float()
        h = a @ v["w"][e].float().t()
        if "bias" in v:
            h = h + v["bias"][e].float()
        if "pre" in pre:
            pre["pre"][lo:hi] = h.to(A.dtype)
        if a_attr["glu"]:
            u = a @ v["w_up"][e].float().t()
            u = u + v["bias_up"][e].float() if "bias_up" in v else u
            if "pre_up" in pre:
                pre["pre_up"][lo:hi] = u.to(A.dtype)
            h = ref.gated(h, u, a_attr["activation"], **glu_variant(a_attr))
        elif a_attr["activation"]:
            h = ref.gated(h, None, a_attr["activation"], **glu_variant(a_attr))
        if rs is not None and not a_attr["scale_in"]:
            h = h * rs
        out[lo:hi] = h.to(out.dtype)
    if a_attr["scatter"]:
        scattered = torch.zeros_like(out)
        kept = int(offsets[E])
        scattered[order[:kept].long()] = out[:kept]
        out = scattered
        for r, t in pre.items():
            pre[r] = torch.zeros_like(t)
            pre[r][order[:kept].long()] = t[:kept]
    return {"out": out, **pre}


@impl("activate")
def _activate(n, v, ctx):
    g = v["gate"]
    h = ref.gated(g.float(), v["up"].float() if n.attr["glu"] else None, n.attr["activation"],
                  **glu_variant(n.attr))
    return {"out": h.to(g.dtype)}


@impl("expert_norm")
def _expert_norm(n, v, ctx):
    y, w = v["y"], v["w"]
    expert = ref.row_experts(v["offsets"], y.shape[0])
    kept = expert < w.shape[0]
    out = torch.where(kept[:, None], ref.expert_norm(y, w[expert.clamp(max=w.shape[0] - 1)], n.attr["eps"]), 0.0)
    if not n.attr["scatter"]:
        return {"out": out}
    pair = v["order"].long()[kept]         # the combine folded in: weighted rows at their pairs' rows
    scattered = torch.zeros_like(out)
    scattered[pair] = out[kept] * v["weights"].reshape(-1)[pair, None].float()
    return {"out": scattered}


@impl("combine")
def _combine(n, v, ctx):
    k = n.attr["top_k"]
    ids = v["ids"]
    T = ids.shape[0]
    pos = torch.empty(T * k, dtype=torch.long, device=ids.device)
    pos[v["order"].long()] = torch.arange(T * k, device=ids.device)
    y = v["y"].float()[pos].view(T, k, v["y"].shape[1])
    if "weights" in v:
        y = y * v["weights"][..., None]
    y = torch.where((ids >= 0)[..., None], y, torch.zeros_like(y))
    return {"out": y.sum(1)}


@impl("reduce_topk")
def _reduce(n, v, ctx):
    k = n.attr["top_k"]
    ids = v["ids"]
    y = v["y"].float().view(ids.shape[0], k, v["y"].shape[1])
    y = torch.where((ids >= 0)[..., None], y, torch.zeros_like(y)).sum(1)
    if "residual" in v:
        y = y + v["residual"].float()
    return {"out": y.to(n.types[0].torch_dtype)}


@impl("add")
def _add(n, v, ctx):
    return {"out": v["a"].float() + v["b"].float()}


@impl("cast")
def _cast(n, v, ctx):
    return {"out": v["x"].to(n.types[0].torch_dtype)}


@impl("select")
def _select(n, v, ctx):
    return {"out": v["a"] if bool(condition(n.attr["when"]).subs(ctx["sizes"])) else v["b"]}


def run_node(n: Node, values: dict, ctx: dict) -> dict:
    got = _IMPL[n.op](n, {r: values[v] for r, v in n.operands}, ctx)
    return {name: got[role] for role, name in n.results}


def interpret(g: Graph, inputs: dict, *, training: bool = False, noise=None, values: bool = False,
              group_size=None):
    """Run ``g`` on ``inputs`` (value name -> tensor); returns the outputs in order (``values=True``: every
    value, by name, as `moec.runtime.program.Program.run` does; ``group_size``: tokens per sequence, for a
    per-sequence capacity)."""
    keep = values
    values = dict(inputs)
    missing = [name for name, _ in g.inputs if name not in values]
    if missing:
        raise ValueError(f"missing graph inputs: {missing}")
    ctx = {"training": training, "noise": noise, "sizes": bind_sizes(binders(g.inputs), values),
           "group_size": group_size}
    for n in g.nodes:
        values.update(run_node(n, values, ctx))
    return values if keep else [values[o] for o in g.outputs]
