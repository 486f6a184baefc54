"""Expert capacity on the device: `moec.reference.apply_capacity`'s result, computed with
fixed-shape torch ops only (no ``.item()``, no boolean-mask indexing, no ``nonzero``/``bincount``),
so a call with capacity can be captured in a CUDA graph.

Pairs are ranked in priority order ``p = slot * T + token`` (slot-major, then token: the
reference's order in every round). With a per-sequence capacity each sequence's experts fill apart: a
pair competes for the virtual expert ``sequence * E + expert`` (``T / S * E`` of them, from host ints).
A round ranks each pending pair among the pending pairs that want the same expert (a stable sort by
expert, ranks from `searchsorted`) and keeps it if the expert's load plus its rank is below the
capacity ``C`` (a host int from T).

- ``overflow="drop"``: one round; pairs past ``C`` get id -1 and weight 0 (GShard's
  position-in-expert cumsum).
- ``overflow="next_best"``: an overflowing pair moves to its token's next-ranked expert (the
  token's pending slots take its next unused ranks in slot order; an expert whose selection key
  is not finite, e.g. outside the chosen groups, is never a candidate) and competes again in the
  next round. A pair that stays pending in round ``r`` has consumed at least ``r - 1`` ranks past
  the top-k, so at most ``E - k + 1`` rounds can assign anything: the graph-safe schedule runs
  exactly that many, each of the same shapes. Outside graph capture (`capturing`) the loop stops
  as soon as nothing is pending, which costs one host read per round (what the greedy loop of the
  reference costs) and saves the empty rounds.

Every kept pair's weight is the reference's: with ``next_best`` it is rewritten as
``score[token, expert] * factor[token]`` (the first round's kept pairs too), with ``drop`` the
routed weight is kept as it is.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moec.reference import DROPPED, ranked, renormalized_over_kept, scores_of, selection_keys
from moec.spec import RouterConfig


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph (then no host read is allowed).
    Tests patch this to run the capture schedule on the CPU."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def max_rounds(cfg: RouterConfig) -> int:
    """Rounds that can assign a pair: 1 with ``drop``, ``E - k + 1`` with ``next_best``."""
    return 1 if cfg.overflow == "drop" else cfg.num_experts - cfg.top_k + 1


def _rank_within_expert(cand: Tensor, pending: Tensor, E: int) -> Tensor:
    """For each pending pair: how many pending pairs before it (in priority order) want its expert."""
    key = torch.where(pending, cand, torch.full_like(cand, E))         # not pending: sorts last
    srt, perm = torch.sort(key, stable=True)
    seg_start = torch.searchsorted(srt, srt, right=False)
    rank = torch.empty_like(cand)
    rank.scatter_(0, perm, torch.arange(cand.numel(), device=cand.device) - seg_start)
    return rank


def apply_capacity(ids: Tensor, weights: Tensor, logits: Tensor, cfg: RouterConfig,
                   score_bias: Optional[Tensor] = None, group_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(ids int32 [T, k], weights fp32 [T, k])`` after capacity, from the routed ``ids``,
    ``weights`` and the router's fp32 ``logits [T, E]`` (what the ``apply_capacity`` IR op takes);
    ``group_size``: tokens per sequence, for a per-sequence capacity (each sequence's experts fill
    separately: a pair competes for the "virtual" expert ``sequence * E + e``)."""
    T, k = ids.shape
    dev = ids.device
    if T == 0:
        return ids.to(torch.int32), weights.float()
    G = cfg.group_tokens(T, group_size)
    E = cfg.num_experts * (T // G)                          # virtual experts: one set per capacity group
    cap = cfg.capacity(G)
    next_best = cfg.overflow == "next_best"
    # pairs in priority order p = slot * T + token
    tok = torch.arange(T, device=dev).repeat(k)
    group = tok // G * cfg.num_experts                     # the first virtual expert of each pair's group
    cand = ids.t().reshape(-1).long() + group
    ids_p = torch.full_like(cand, DROPPED)
    w_p = weights.t().reshape(-1).float().clone()
    pending = torch.ones(T * k, dtype=torch.bool, device=dev)
    used = torch.zeros(E, dtype=torch.long, device=dev)
    if next_best:
        scores = scores_of(logits.float(), cfg)
        sel = selection_keys(scores, cfg, score_bias, logits)
        order = ranked(sel, cfg.num_experts)                            # [T, E]: each token's preference
        full = scores.gather(1, ids.long())
        factor = weights[:, :1].float() / full[:, :1]                   # the route's per-token normalisation
        w_p = torch.zeros_like(w_p)
        next_rank = torch.full((T,), k, dtype=torch.long, device=dev)
    rounds = max_rounds(cfg)
    sync_free = capturing(dev)
    for r in range(rounds):
        rank = _rank_within_expert(cand, pending, E)
        safe = torch.where(pending, cand, group)                         # any valid index for the rest
        ok = pending & (used.gather(0, safe) + rank < cap)
        used.scatter_add_(0, safe, ok.long())
        ids_p = torch.where(ok, cand - group, ids_p)
        if next_best:
            w_p = torch.where(ok, scores[tok, safe - group] * factor[tok, 0], w_p)
        pending = pending & ~ok
        if not next_best or r == rounds - 1:
            break
        # each token's pending slots take its next unused ranks, in slot order
        grid = pending.view(k, T).long()
        offset = (torch.cumsum(grid, 0) - grid).reshape(-1)
        rnk = next_rank[tok] + offset
        next_rank = next_rank + grid.sum(0)
        in_range = rnk < cfg.num_experts
        nxt = order[tok, rnk.clamp(max=cfg.num_experts - 1)]
        pending = pending & in_range & torch.isfinite(sel[tok, nxt])
        cand = torch.where(pending, nxt + group, cand)
        if not sync_free and not bool(pending.any()):
            break
    if not next_best and cfg.dropped != "pass":            # a passed pair keeps its weight
        w_p = torch.where(ids_p == DROPPED, torch.zeros_like(w_p), w_p)
    ids_out = ids_p.view(k, T).t().contiguous()
    if cfg.renormalize_kept:                                 # the weights normalised over the kept pairs
        return ids_out.to(torch.int32), renormalized_over_kept(scores_of(logits.float(), cfg), ids_out, cfg)
    return ids_out.to(torch.int32), w_p.view(k, T).t().contiguous()
