"""The eager reference: what an MoE layer computes, in a few lines of torch per step.

This is the ground truth the generated kernels, the IR interpreter and the lifted regions are
tested against. All arithmetic is float32 (inputs upcast); results are cast back by callers.
Semantics of every option are documented on `moec.spec.RouterConfig`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .spec import MoESpec, MoEWeights, RouterConfig

DROPPED = -1  # expert id of a (token, slot) pair dropped by capacity


def activation(name: str, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``name`` on ``x``; ``alpha`` is silu's slope: ``x * sigmoid(alpha * x)``."""
    if name == "silu":
        return F.silu(x) if alpha == 1.0 else x * torch.sigmoid(alpha * x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    raise ValueError(f"unknown activation {name!r}")


def ranked(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row; ties go to the lower index, NaN ranks first."""
    key = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]


def router_logits(x: torch.Tensor, w_router: torch.Tensor, b_router: Optional[torch.Tensor] = None,
                  w_noise: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 logits ``x @ w_router.T (+ b)``, plus ``noise * softplus(x @ w_noise.T)`` when noisy."""
    logits = x.float() @ w_router.float().t()
    if b_router is not None:
        logits = logits + b_router.float()
    if noise is not None:
        logits = logits + noise.float() * F.softplus(x.float() @ w_noise.float().t())
    return logits


def logits_of(x: torch.Tensor, w: MoEWeights, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's fp32 router logits for ``x [T, d]``: its external router's output (`MoEWeights.router`), else
    `router_logits` of its router weights (with ``noise`` when noisy)."""
    if w.router is not None:
        return w.router(x).float()
    return router_logits(x, w.w_router, w.b_router, w.w_noise, noise)


def scores_of(logits: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    if cfg.score == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return torch.softmax(logits, dim=-1) if cfg.score == "softmax" else torch.sigmoid(logits)


def selection_keys(scores: torch.Tensor, cfg: RouterConfig, score_bias: Optional[torch.Tensor],
                   logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The values experts are ranked by: biased scores (biased logits for ``logits_then_score``, which
    needs ``logits``), experts outside the chosen groups at -inf."""
    if cfg.order == "logits_then_score":
        if logits is None:
            raise ValueError("order='logits_then_score' ranks the logits: pass them")
        scores = logits.float()
    sel = scores + score_bias.float() if score_bias is not None else scores
    if cfg.n_group > 1:
        T, E = sel.shape
        grouped = sel.view(T, cfg.n_group, E // cfg.n_group)
        if cfg.group_score == "max":
            gscore = grouped.max(dim=-1).values
        else:
            gscore = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        keep = torch.zeros_like(gscore, dtype=torch.bool)
        keep.scatter_(1, ranked(gscore, cfg.topk_group), True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
    return sel


def table_choices(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` int64: each token's row of a token table ``[V, k]`` (`RouterConfig.token_table`), as
    ``table[tokens.reshape(-1)]`` (an id outside ``[0, V)`` raises, as it does in eager code)."""
    return table[tokens.reshape(-1)].long()


def route(logits: torch.Tensor, cfg: RouterConfig, score_bias: Optional[torch.Tensor] = None,
          group_size: Optional[int] = None, choices: Optional[torch.Tensor] = None):
    """Top-k routing. Returns ``(ids [T,k] int64, weights [T,k] fp32, aux_loss fp32 scalar or None)``.
    With ``cfg.token_table`` the choices are given (``choices [T, k]``, `table_choices`) and only weighted.

    Capacity (if configured) is applied per group of ``group_size`` tokens (a sequence: see
    `RouterConfig.capacity_per`; None: the call is one sequence): dropped pairs get id ``DROPPED`` and
    weight 0 (with ``dropped="pass"`` they keep their weight).
    """
    logits = logits.float()
    T, E = logits.shape
    k = cfg.top_k
    scores = scores_of(logits, cfg)
    if cfg.token_table:
        if choices is None or tuple(choices.shape) != (T, k):
            raise ValueError(f"a token-table router needs choices [T, k] = [{T}, {k}], got "
                             f"{None if choices is None else list(choices.shape)}")
        ids = choices.long()
        weights = scores.gather(1, ids)
        if cfg.order == "topk_then_score" or cfg.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + (0.0 if cfg.order == "topk_then_score" else 1e-20))
        return ids, weights * cfg.routed_scaling, None
    if cfg.order == "topk_then_score":
        sel = logits
        ids = ranked(sel, k)
        weights = torch.softmax(logits.gather(1, ids), dim=-1)
        factor = 1.0 / scores.gather(1, ids).sum(-1, keepdim=True)   # the same weights, from scores
    else:
        sel = selection_keys(scores, cfg, score_bias, logits)
        ids = ranked(sel, k)
        weights = scores.gather(1, ids)
        factor = torch.ones_like(weights[:, :1])
        if cfg.renormalize:
            factor = 1.0 / (weights.sum(-1, keepdim=True) + 1e-20)
            weights = weights * factor
    weights = weights * cfg.routed_scaling
    factor = factor * cfg.routed_scaling
    aux = load_balancing_loss(scores, ids, cfg) if cfg.aux_loss else None
    if cfg.has_capacity:
        ids, weights = apply_capacity(ids, weights, scores, sel, factor, cfg, group_size)
        if cfg.renormalize_kept:
            weights = renormalized_over_kept(scores, ids, cfg)
    return ids, weights, aux


def renormalized_over_kept(scores: torch.Tensor, ids: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """``[T, k]`` fp32 weights normalised over the pairs capacity kept (`RouterConfig.renormalize_kept`)."""
    kept = ids >= 0
    picked = torch.where(kept, scores.gather(1, torch.where(kept, ids, torch.zeros_like(ids)).long()), 0.0)
    total = picked.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    return picked / total * cfg.routed_scaling


def weights_given_ids(logits: torch.Tensor, cfg: RouterConfig, ids: torch.Tensor,
                      ids_routed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routing weights `route` gives for the choices it made, as a differentiable function of the
    logits alone: ``weights[t, s] = score[t, ids[t, s]] * factor[t]`` (0 for dropped pairs), the factor
    normalising over the top-k choices before capacity (``ids_routed``; ``ids`` when there is no
    capacity). The backward of the routing: the choices themselves (ranking, groups, selection bias,
    capacity) have no gradient."""
    scores = scores_of(logits.float(), cfg)
    if cfg.renormalize_kept:
        return renormalized_over_kept(scores, ids, cfg)
    if cfg.dropped == "pass" and ids_routed is not None:
        ids = ids_routed                # a pair passed through keeps its routed weight
    chosen = (ids if ids_routed is None else ids_routed).long()
    factor = torch.full_like(scores[:, :1], cfg.routed_scaling)
    if cfg.order == "topk_then_score":
        factor = factor / scores.gather(1, chosen).sum(-1, keepdim=True)
    elif cfg.renormalize:
        factor = factor / (scores.gather(1, chosen).sum(-1, keepdim=True) + 1e-20)
    kept = ids >= 0
    picked = scores.gather(1, torch.where(kept, ids, torch.zeros_like(ids)).long())
    return torch.where(kept, picked * factor, torch.zeros_like(picked))


def route_backward(logits: torch.Tensor, cfg: RouterConfig, ids: torch.Tensor, d_weights: torch.Tensor,
                   ids_routed: Optional[torch.Tensor] = None, d_aux: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of the fp32 ``logits`` [T, E] from those of the routing weights ``d_weights`` [T, k]
    (`weights_given_ids`) and of the load-balancing loss ``d_aux`` (`load_balancing_loss` of the choices
    before capacity), written out (no autograd): the choices have no gradient."""
    logits = logits.float()
    T, E = logits.shape
    scores = scores_of(logits, cfg)
    if cfg.dropped == "pass" and ids_routed is not None:
        ids = ids_routed                # a pair passed through keeps its routed weight
    chosen = (ids if ids_routed is None else ids_routed).long()
    kept = ids >= 0
    at = torch.where(kept, ids, torch.zeros_like(ids)).long()
    dw = torch.where(kept, d_weights.float(), torch.zeros_like(d_weights, dtype=torch.float32))
    picked = scores.gather(1, at)
    factor = torch.full_like(scores[:, :1], cfg.routed_scaling)
    total, over, among = None, chosen, torch.ones_like(kept)      # the total normalises over `over` (where `among`)
    if cfg.renormalize_kept:
        over, among = at, kept
        total = torch.where(kept, picked, 0.0).sum(-1, keepdim=True)
        clamped = total < torch.finfo(torch.float32).eps
        total = total.clamp(min=torch.finfo(torch.float32).eps)
        factor = factor / total
    elif cfg.order == "topk_then_score" or cfg.renormalize:
        total = scores.gather(1, chosen).sum(-1, keepdim=True) + (0.0 if cfg.order == "topk_then_score" else 1e-20)
        factor = factor / total
    d_scores = torch.zeros_like(scores).scatter_add_(1, at, dw * factor)
    if total is not None:      # factor = c / total: d total = -factor / total * sum_s dw * picked
        d_total = -(factor / total) * (dw * picked).sum(-1, keepdim=True)
        if cfg.renormalize_kept:
            d_total = torch.where(clamped, 0.0, d_total)          # a clamped total is a constant
        d_scores.scatter_add_(1, over, (d_total * among).contiguous())
    if d_aux is not None and cfg.aux_loss and T:
        counted = chosen[:, :1] if cfg.aux_counts == "first" else chosen
        counts = torch.zeros(E, device=logits.device).index_add_(
            0, counted.reshape(-1), torch.ones(counted.numel(), device=logits.device))
        d_probs = (d_aux.float() * E / (T * T) * counts).expand(T, E)
        if cfg.score == "softmax":
            d_scores = d_scores + d_probs
        else:                  # probs = scores / sum(scores)
            s_sum = scores.sum(-1, keepdim=True)
            d_scores = d_scores + (d_probs - (d_probs * scores).sum(-1, keepdim=True) / s_sum) / s_sum
    if cfg.score == "softmax":
        return scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))
    if cfg.score == "sqrtsoftplus":    # d sqrt(softplus(z)) = sigmoid(z) / (2 sqrt(softplus(z)))
        return torch.where(scores > 0, d_scores * torch.sigmoid(logits) / (2 * scores), 0.0)
    return d_scores * scores * (1.0 - scores)


def first_choice_counts(ids: torch.Tensor, E: int) -> torch.Tensor:
    """``[E]`` int64: tokens whose first choice (``ids[:, 0]``) is each expert (a scatter: no host sync)."""
    first = ids[:, 0].long()
    return torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, first, torch.ones_like(first))


def aux_from_counts(counts: torch.Tensor, prob_sum: torch.Tensor, ids: torch.Tensor, E: int,
                    first_choice: bool = False) -> torch.Tensor:
    """`load_balancing_loss` from what the fused route kernel gives: per-expert pair ``counts`` and the scores'
    column sums ``prob_sum``, with ``first_choice`` the first choices of ``ids`` counted instead (0 for T = 0)."""
    T = max(ids.shape[0], 1)            # T = 0: counts are all zero, so the loss is 0
    counts = first_choice_counts(ids, E) if first_choice else counts
    return E * torch.sum(counts.float() / T * prob_sum.float() / T)


def load_balancing_loss(scores: torch.Tensor, ids: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """``E * sum_e (n_e / T) * P_e`` (see `RouterConfig`); 0 for an empty batch."""
    T, E = scores.shape
    if T == 0:
        return scores.new_zeros(())
    probs = scores if cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)
    counted = ids[:, :1] if cfg.aux_counts == "first" else ids
    counts = torch.bincount(counted.reshape(-1), minlength=E).float()
    return E * torch.sum(counts / T * probs.mean(0))


def apply_capacity(ids, weights, scores, sel, factor, cfg: RouterConfig, group_size: Optional[int] = None):
    """Enforce per-expert capacity (slot-major, then token priority, per capacity group); see `RouterConfig`.
    Each group's experts count separately: a pair wants the "virtual" expert ``group * E + e``."""
    T, k = ids.shape
    E = cfg.num_experts
    G = cfg.group_tokens(T, group_size)
    cap = cfg.capacity(G)
    ids, weights = ids.clone(), weights.clone()
    routed_weights = weights.clone()
    groups = max(1, T // max(G, 1))
    used = torch.zeros(groups * E, dtype=torch.long, device=ids.device)
    # pairs in priority order: p = slot * T + token
    pend_tok = torch.arange(T, device=ids.device).repeat(k)
    pend_slot = torch.arange(k, device=ids.device).repeat_interleave(T)
    cand = ids.t().reshape(-1)
    order = ranked(sel, E) if cfg.overflow == "next_best" else None
    next_rank = torch.full((T,), k, dtype=torch.long, device=ids.device)
    while cand.numel():
        # rank of each candidate among candidates of the same expert of its group, in priority order
        virt = pend_tok // max(G, 1) * E + cand
        srt = torch.sort(virt, stable=True)
        seg_start = torch.searchsorted(srt.values, srt.values, right=False)
        rank = torch.empty_like(cand)
        rank[srt.indices] = torch.arange(cand.numel(), device=ids.device) - seg_start
        ok = used[virt] + rank < cap
        used += torch.bincount(virt[ok], minlength=groups * E)
        ids[pend_tok[ok], pend_slot[ok]] = cand[ok]
        if order is not None:
            weights[pend_tok[ok], pend_slot[ok]] = scores[pend_tok[ok], cand[ok]] * factor[pend_tok[ok], 0]
        pend_tok, pend_slot = pend_tok[~ok], pend_slot[~ok]
        ids[pend_tok, pend_slot] = DROPPED
        weights[pend_tok, pend_slot] = routed_weights[pend_tok, pend_slot] if cfg.dropped == "pass" else 0.0
        if order is None or pend_tok.numel() == 0:
            break
        # next candidates: each token's pending slots take its next unused ranks, in slot order
        ps = torch.sort(pend_slot, stable=True).indices
        pend_tok, pend_slot = pend_tok[ps], pend_slot[ps]
        ts = torch.sort(pend_tok, stable=True)
        first = torch.searchsorted(ts.values, ts.values, right=False)
        offset = torch.empty_like(pend_tok)
        offset[ts.indices] = torch.arange(pend_tok.numel(), device=ids.device) - first
        rnk = next_rank[pend_tok] + offset
        next_rank.index_add_(0, pend_tok, torch.ones_like(pend_tok))
        live = rnk < E
        live[live.clone()] &= torch.isfinite(sel[pend_tok[live], order[pend_tok[live], rnk[live]]])
        pend_tok, pend_slot = pend_tok[live], pend_slot[live]
        cand = order[pend_tok, rnk[live]]
    return ids, weights


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (``x`` itself for no cap)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def gated(gate: torch.Tensor, up: Optional[torch.Tensor], act: str, act_alpha: float = 1.0,
          glu_limit: Optional[float] = None, up_shift: float = 0.0, gate_softcap: Optional[float] = None,
          up_softcap: Optional[float] = None) -> torch.Tensor:
    """The hidden activation from fp32 projections: ``act(gate) * (up + up_shift)`` with the
    `MoESpec` clamps and softcaps (GLU), or ``act(gate)`` when ``up`` is None."""
    if up is None:
        return activation(act, gate, act_alpha)
    if glu_limit is not None:
        gate = gate.clamp(max=glu_limit)
        up = up.clamp(-glu_limit, glu_limit)
    a = activation(act, gate, act_alpha) if gate_softcap is None else \
        softcap(gate, gate_softcap) * torch.sigmoid(act_alpha * gate)
    return a * (softcap(up, up_softcap) + up_shift)


def _biased(x, w, b):
    y = x @ w.float().t()
    return y + b.float() if b is not None else y


def expert_mlp(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gate: Optional[torch.Tensor],
               act: str, variant: Optional[dict] = None, biases=(None, None, None)) -> torch.Tensor:
    """One expert on fp32 rows: ``down(act(gate(x)) * up(x))`` (GLU) or ``down(act(up(x)))``.
    ``variant``: the GLU variant (`MoESpec.glu_variant`); ``biases``: ``(b_gate, b_up, b_down)``
    rows of this expert, or Nones."""
    b_gate, b_up, b_down = biases
    u = _biased(x, up, b_up)
    h = gated(_biased(x, gate, b_gate), u, act, **(variant or {})) if gate is not None \
        else gated(u, None, act, **(variant or {}))
    return _biased(h, down, b_down)


def row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each of ``rows`` rows grouped by expert (``offsets [E + 1]``); E for rows past the last."""
    return torch.searchsorted(offsets[1:].long().contiguous(), torch.arange(rows, device=offsets.device), right=True)


def expert_norm(y: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of one expert's output ``y`` RMS-normalised in fp32 and scaled by the expert's norm weight ``w [d]``
    (`MoESpec.expert_norm`)."""
    return F.rms_norm(y.float(), (y.shape[-1],), eps=eps) * w.float()


def identity_share(ids: torch.Tensor, weights: torch.Tensor, ffn_experts: int, dropped: bool = False) -> torch.Tensor:
    """``[T, 1]`` fp32: each token's summed routing weight over the slots that picked an identity expert (a
    choice ``>= ffn_experts``), and with ``dropped`` the slots capacity dropped (passed through); the layer
    adds this times the token."""
    return torch.where(passed_slots(ids, ffn_experts, dropped), weights.float(), 0.0).sum(1, keepdim=True)


def passed_slots(ids: torch.Tensor, ffn_experts: int, dropped: bool = False) -> torch.Tensor:
    """The slots whose token passes through (`identity_share`): an identity expert's, or a dropped pair's."""
    return (ids >= ffn_experts) | (ids == DROPPED) if dropped else ids >= ffn_experts


def moe(x: torch.Tensor, w: MoEWeights, spec: MoESpec, noise: Optional[torch.Tensor] = None,
        group_size: Optional[int] = None, tokens: Optional[torch.Tensor] = None):
    """The whole layer on ``x [T, d]`` (``group_size``: tokens per sequence, for a per-sequence capacity;
    ``tokens``: the token ids a token-table router reads): returns ``(y [T, d] in x.dtype, aux_loss or None)``."""
    xf = x.float()
    cfg = spec.router
    logits = logits_of(x, w, noise if cfg.noisy else None)
    choices = table_choices(w.token_table, tokens) if cfg.token_table else None
    ids, weights, aux = route(logits, cfg, w.score_bias, group_size, choices)
    y = torch.zeros_like(xf)
    if spec.identity_experts or cfg.dropped == "pass":        # identity picks / passed pairs add weight * x
        y = y + xf * identity_share(ids, weights, spec.ffn_experts, cfg.dropped == "pass")
    for e in range(spec.ffn_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            biases = tuple(b[e] if b is not None else None for b in (w.b_gate, w.b_up, w.b_down)) \
                if spec.expert_bias else (None, None, None)
            rows, scale = xf[tok], weights[tok, slot, None]
            if spec.input_scaled:           # the weight scales the expert's input (Llama4), not its output
                rows, scale = rows * scale, 1.0
            out = expert_mlp(rows, w.w_up[e], w.w_down[e], w.w_gate[e] if spec.glu else None,
                             spec.activation, spec.glu_variant, biases)
            if spec.expert_norm is not None:
                out = expert_norm(out, w.w_expert_norm[e], spec.expert_norm)
            y.index_add_(0, tok, out * scale)
    if spec.shared is not None:
        s = expert_mlp(xf, w.shared_up, w.shared_down, w.shared_gate if spec.glu else None, spec.activation,
                       variant=spec.shared_variant)
        if spec.shared.gated:
            s = s * torch.sigmoid(xf @ w.shared_gate_proj.float().t())
        y = y + s
    if w.shared is not None:            # an external shared expert (`MoEWeights.shared`), added as eager adds it
        return y.to(x.dtype) + w.shared(x), aux
    return y.to(x.dtype), aux
