"""The four MoE layers that ``benchmarks/moe.py`` times (Mixtral 8x7B, Qwen3-30B-A3B, DeepSeek-V3,
OLMoE; each also tiny, for ``--small``), their random weights, and the two peers written in plain
PyTorch: ``eager_moe`` (the layer as model code writes it, which every method's output is checked
against) and ``grouped_mm_moe`` (the experts as ``torch._grouped_mm`` calls).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moec.spec import MoESpec, MoEWeights, RouterConfig, SharedExpertConfig


@dataclass(frozen=True)
class Model:
    name: str
    spec: MoESpec
    small: MoESpec              # the same layer, tiny (for --small)


def _models() -> dict[str, Model]:
    def softmax(E, k, renorm):
        return RouterConfig(E, k, renormalize=renorm)

    def dsv3(E, k, groups, keep):
        return RouterConfig(E, k, score="sigmoid", score_bias=True, n_group=groups, topk_group=keep,
                            group_score="top2_sum", renormalize=True, routed_scaling=2.5)
    return {m.name: m for m in (
        Model("mixtral-8x7b", MoESpec(4096, 14336, softmax(8, 2, True)), MoESpec(64, 128, softmax(8, 2, True))),
        Model("qwen3-30b-a3b", MoESpec(2048, 768, softmax(128, 8, True)), MoESpec(32, 16, softmax(32, 8, True))),
        Model("deepseek-v3", MoESpec(7168, 2048, dsv3(256, 8, 8, 4), shared=SharedExpertConfig(2048)),
              MoESpec(64, 32, dsv3(32, 8, 8, 4), shared=SharedExpertConfig(32))),
        Model("olmoe", MoESpec(2048, 1024, softmax(64, 8, False)), MoESpec(32, 32, softmax(16, 8, False))),
    )}


MODELS = _models()
ALIASES = {"mixtral": "mixtral-8x7b", "qwen3": "qwen3-30b-a3b", "deepseek": "deepseek-v3", "dsv3": "deepseek-v3"}


# ---- weights and the eager layer ---------------------------------------------------------------

def make_weights(spec: MoESpec, dtype, device, seed=0) -> MoEWeights:
    """Random weights drawn on ``device`` (DeepSeek-V3's experts are 11G values: a CPU draw would
    take minutes) in ``dtype``, scaled by 1/sqrt(fan-in)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    E, d, f = spec.num_experts, spec.hidden, spec.ffn

    def rnd(*shape, fan_in):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).div_(math.sqrt(fan_in))
    w = MoEWeights(w_router=rnd(E, d, fan_in=d), w_up=rnd(E, f, d, fan_in=d), w_down=rnd(E, d, f, fan_in=f),
                   w_gate=rnd(E, f, d, fan_in=d))
    if spec.router.score_bias:
        w.score_bias = torch.randn(E, generator=gen, device=device) * 0.1
    if spec.shared is not None:
        fs = spec.shared.width
        w.shared_up, w.shared_gate = rnd(fs, d, fan_in=d), rnd(fs, d, fan_in=d)
        w.shared_down = rnd(d, fs, fan_in=fs)
    return w


def route(x, w: MoEWeights, cfg: RouterConfig):
    """Model-code routing: fp32 logits, softmax/top-k (+ renormalise) or DeepSeek-V3's sigmoid with a
    selection-only bias, top-2-sum group scores, top groups, top-k, renormalised and scaled."""
    logits = x.float() @ w.w_router.float().t()
    if cfg.score == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        sel = scores + w.score_bias.float()
        T, E = sel.shape
        grouped = sel.view(T, cfg.n_group, E // cfg.n_group)
        gscore = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(cfg.topk_group, dim=-1).indices, 1.0)
        sel = sel.masked_fill(keep.repeat_interleave(E // cfg.n_group, dim=1) == 0, float("-inf"))
        ids = sel.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * cfg.routed_scaling


def _mlp(x, gate, up, down):
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def eager_moe(x, w: MoEWeights, spec: MoESpec):
    """The layer as model code writes it: a loop over the experts that were hit."""
    ids, weights = route(x, w, spec.router)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        out = _mlp(x[tok], w.w_gate[e], w.w_up[e], w.w_down[e])
        y.index_add_(0, tok, out.float() * weights[tok, slot, None])
    if spec.shared is not None:
        y += _mlp(x, w.shared_gate, w.shared_up, w.shared_down).float()
    return y.to(x.dtype)


ALIGN = 16


def grouped_mm_moe(x, w: MoEWeights, spec: MoESpec):
    """Routed experts as two ``torch._grouped_mm`` calls; rows sorted by expert, each expert's
    group padded to ALIGN rows; every size depends on T only (no host synchronisation)."""
    ids, weights = route(x, w, spec.router)
    T, k = ids.shape
    E = spec.num_experts
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    dest = ends[e_sorted] - padded[e_sorted] + torch.arange(T * k, device=x.device) - first[e_sorted]
    rows = (T * k + E * (ALIGN - 1) + ALIGN - 1) // ALIGN * ALIGN
    xa = x.new_zeros(rows, x.shape[1])
    xa[dest] = x[order // k]
    offs = ends.to(torch.int32)
    h = F.silu(torch._grouped_mm(xa, w.w_gate.transpose(1, 2), offs=offs)) * \
        torch._grouped_mm(xa, w.w_up.transpose(1, 2), offs=offs)
    out = torch._grouped_mm(h, w.w_down.transpose(1, 2), offs=offs)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y.index_add_(0, order // k, out[dest].float() * weights.reshape(-1)[order, None])
    if spec.shared is not None:
        y += _mlp(x, w.shared_gate, w.shared_up, w.shared_down).float()
    return y.to(x.dtype)
