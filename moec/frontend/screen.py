"""Screening a candidate configuration cheaply: expert outputs on one probe input computed once (only for the
(expert, token) pairs some candidate routing asks for), then each candidate's routing recomputed and combined
(`screen_y`), before the full probe (`moec.frontend.probe`) judges the first that matches.
"""
from __future__ import annotations

import torch

from .. import reference
from .experts import ExpertLayout


class ExpertRows:
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
            biases = tuple(w[b][e] if b in w else None for b in ("b_gate", "b_up", "b_down"))
            self.Y[e, rows] = reference.expert_mlp(self.xf[rows], w["w_up"][e], w["w_down"][e],
                                                   w["w_gate"][e] if lay.glu else None, lay.activation,
                                                   variant=dict(lay.variant), biases=biases)
        self.have |= need
        return self.Y


def screen_y(xf, w, cfg, experts: ExpertRows, S, noise, group_size=None, x=None, choices=None):
    """y and the aux loss of the rows ``xf`` (fp32; ``x``: them in the layer's dtype, what an external router
    reads; ``choices``: a token table's rows for them) under ``cfg``, from the experts' precomputed rows."""
    logits = reference.logits_of(x if w.router is not None else xf, w, noise)
    ids, wts, aux = reference.route(logits, cfg, w.score_bias, group_size, choices if cfg.token_table else None)
    T = xf.shape[0]
    E = experts.Y.shape[0]
    valid = (ids >= 0) & (ids < E)                       # choices past the experts: identity experts
    ffn = torch.where(valid, ids, -1)
    Y = experts.get(ffn)
    y = (Y[ffn.clamp(min=0), torch.arange(T, device=xf.device)[:, None]] * (wts * valid)[..., None]).sum(1)
    if (ids >= E).any() or cfg.dropped == "pass":         # identity picks, pairs passed through
        y = y + xf * reference.identity_share(ids, wts, E, cfg.dropped == "pass")
    return (y + S if S is not None else y), aux
