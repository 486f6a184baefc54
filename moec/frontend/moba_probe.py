"""The MoBA probe: does the matched core compute `moec.moba.reference.moba_reference`?

Matching by structure proposes (`moec.frontend.moba_match`); the probe confirms, per sequence
length, on random inputs:

1. the module's own eager forward and a replay of the traced graph (an `fx.Interpreter` keeping
   every value) run on the same inputs under the same RNG seed and must agree (so the specialised
   graph is the forward, not an approximation of it);
2. the core's output, read from the replay, is compared with ``moba_reference`` of the core's
   q, k, v (brought to ``[B, H, N, D]``) for each candidate ``top_k`` (the ``topk`` count, or one more
   when the code selects the past blocks only and adds the own block itself); the first that
   matches is the configuration;
3. when none matches, the output is compared with the variants moec does not lift, to name the
   cause: the own block not forced into the selection, attention not causal inside the own block,
   dense causal attention (no selection). Otherwise the message gives the error.

Inputs, runs and tolerances are the harness's (`moec.frontend.probe_harness`): every eager run and
replay gets copies of the inputs, restores flags and buffers and draws from the same seeded RNG fork;
max |core - reference| <= rtol * max |reference|, leaving out query rows whose gate is a near tie at
the top-k boundary (there a rounding difference may legitimately pick another block).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from ..moba import reference
from .moba_match import CoreMatch
from .probe_harness import draw, mismatch, near_tie, run
from .trace import Bound, Traced, eager_forward

_SEED = 1234          # every eager run and replay draws the same random numbers


def to_bhnd(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """A ``[B, h, N, D]`` view of a tensor whose sequence dim is ``seq_dim`` (1 or 2; 0 for one packed
    sequence ``[N, h, D]``, seen as a batch of one)."""
    if t.dim() == 3:
        return t.unsqueeze(0).transpose(1, 2)
    return t if seq_dim == 2 else t.transpose(1, 2)


def from_bhnd(t: torch.Tensor, seq_dim: int, rank: int) -> torch.Tensor:
    """`to_bhnd` undone: ``[B, h, N, D]`` back to a ``rank``-dim tensor whose sequence dim is ``seq_dim``."""
    if rank == 3:
        return t.squeeze(0).transpose(0, 1)
    return t if seq_dim == 2 else t.transpose(1, 2)


def random_bound(bound: Bound, seq_dims: dict, N: int, gen: torch.Generator, keep=()) -> Bound:
    """``bound`` with every tensor argument (but those named in ``keep``) replaced by random values, its
    sequence dim resized to N."""
    vals = []
    for name, v in zip(bound.names, bound.values):
        if not isinstance(v, torch.Tensor) or name in keep:
            vals.append(v)
            continue
        shape = list(v.shape)
        if name in seq_dims:
            shape[seq_dims[name]] = N
        if v.is_floating_point():
            vals.append(draw(shape, gen, v.dtype, v.device))
        elif v.dtype == torch.bool:
            vals.append(torch.ones(shape, dtype=torch.bool, device=v.device))
        elif name in seq_dims:                    # positions along the sequence (position_ids)
            pos = torch.arange(N).view([-1 if i == seq_dims[name] else 1 for i in range(len(shape))])
            vals.append(pos.expand(shape).to(v.dtype).to(v.device).clone())
        else:
            vals.append(v.clone())
    return Bound(bound.names, tuple(vals))


def near_ties(q, k, block_size: int, top_k: int, dtype) -> torch.Tensor:
    """``[B, H, N]``: rows whose (top_k-1)-th and top_k-th past-block scores are within rounding."""
    B, H, N, _ = q.shape
    out = torch.zeros(B, H, N, dtype=torch.bool, device=q.device)
    k1 = top_k - 1
    for b, s in enumerate(reference.gate_scores(q, k, block_size=block_size)):   # [H, N, nb]
        nb = s.shape[-1]
        if k1 < 1 or nb <= k1:
            continue
        own = torch.arange(N, device=q.device) // block_size
        past = torch.arange(nb, device=q.device)[None, :] < own[:, None]
        out[b] = near_tie(torch.where(past, s, float("-inf")), k1, dtype, s.abs().amax(-1) + 1e-6)
    return out


def variant(q, k, v, block_size: int, top_k: int, *, force_own=True, padded=False) -> torch.Tensor:
    """Dense MoBA-like attention with the own-block forcing switchable and the partial last block pooled
    over its real length or zero-padded to ``block_size`` (diagnosis only: with forcing, that block never
    competes; without, it does)."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    qf, kf, vf = (t.double() for t in (q, k, v))
    nb = -(-N // block_size)
    if padded:
        pooled = F.pad(kf, (0, 0, 0, nb * block_size - N)).reshape(B, -1, nb, block_size, D).mean(3)
    else:
        pooled = torch.stack([reference.pooled_keys(kf[b], block_size) for b in range(B)])
    s = qf @ pooled.repeat_interleave(G, 1).transpose(-1, -2)                          # [B, H, N, nb]
    own = torch.arange(N, device=q.device) // block_size
    j = torch.arange(nb, device=q.device)
    eligible = j[None, :] < own[:, None]
    if not force_own:
        eligible = eligible | (j[None, :] == own[:, None])
    kk = min(top_k - 1 if force_own else top_k, nb)
    chosen = torch.zeros_like(s, dtype=torch.bool)
    if kk > 0:
        top = torch.topk(torch.where(eligible, s, float("-inf")), kk, dim=-1)
        chosen.scatter_(-1, top.indices, torch.isfinite(top.values))
    if force_own:
        chosen |= (j[None, :] == own[:, None])
    mask = chosen.repeat_interleave(block_size, -1)[..., :N] & torch.ones(N, N, dtype=torch.bool).tril()
    att = torch.where(mask, qf @ kf.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D), float("-inf"))
    p = torch.nan_to_num(torch.softmax(att, -1))
    return (p @ vf.repeat_interleave(G, 1)).to(q.dtype)


class _Replay(fx.Interpreter):
    """Runs the traced graph keeping every value; ``overrides`` replace chosen nodes' values."""

    def __init__(self, gm, overrides=None):
        super().__init__(gm, garbage_collect_values=False)
        self.overrides = overrides or {}

    def run_node(self, n):
        return self.overrides[n] if n in self.overrides else super().run_node(n)


def _replay(tr: Traced, bound: Bound, want: list, overrides=None) -> tuple[object, list]:
    """The graph's output and the values of ``want`` on ``bound``: a harness run (copied inputs) drawing
    the same random numbers as the eager run it is compared with."""
    def replay(*values):
        owner = tr.graph.owning_module
        try:
            interp = _Replay(fx.GraphModule(tr.root, tr.graph), overrides)
            out = interp.run(*values)
        finally:
            tr.graph.owning_module = owner            # the graph stays free for the rewrite
        return out, [interp.env[n] for n in want]
    return run(replay, bound.values, tr.root, tr.root.training, _device(bound), _SEED)


def _device(bound: Bound) -> torch.device:
    return next((t.device for t in bound.tensors().values()), torch.device("cpu"))


def _same(a, b) -> bool:
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.allclose(
                x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)):
            return False
    return True


def probe(module, bound: Bound, tr: Traced, cores: list[CoreMatch], top_ks: list[int]) -> tuple[Optional[int], str]:
    """``(top_k, "")`` for the first candidate every core matches at this input, else ``(None, why)``."""
    eager = run(eager_forward(module), bound.values, module, module.training, _device(bound), _SEED)
    replay, got = _replay(tr, bound, [n for m in cores for n in (m.q, m.k, m.v, m.out)])
    if not _same(eager, replay):
        return None, "the traced graph does not reproduce the eager forward (randomness or side effects?)"
    views = []
    for i, m in enumerate(cores):
        sd = m.seq_dims
        views.append([to_bhnd(t, sd[r]) for t, r in zip(got[4 * i:4 * i + 4], ("q", "k", "v", "out"))])
    errors = []
    for top_k in top_ks:
        err = None
        for m, (q, k, v, o) in zip(cores, views):
            ref = reference.moba_reference(q, k, v, block_size=m.block_size, top_k=top_k)[0]
            keep = ~near_ties(q, k, m.block_size, top_k, q.dtype)
            err = mismatch(o[keep], ref[keep], o.dtype)
            if err is not None:
                where = f" (the core at {m.out.name}, N={q.shape[2]})" if len(cores) > 1 else ""
                errors.append(f"top_k={top_k}: {err}{where}")
                bad = (m, q, k, v, o)
                break
        if err is None:
            return top_k, ""
    m, q, k, v, o = bad
    why = _diagnose(q, k, v, o, m.block_size, top_ks, o.dtype) or _noncausal(tr, bound, m, o)
    return None, why or "; ".join(errors)


def _noncausal(tr: Traced, bound: Bound, m: CoreMatch, o: torch.Tensor) -> Optional[str]:
    """Replay the core with the keys and values after position t0 perturbed: a causal core's output at
    positions <= t0 cannot change."""
    N = o.shape[2]
    if N < 2:
        return None
    t0 = N // 2
    env = {}
    _, (k, v) = _replay(tr, bound, [m.k, m.v])
    for node, t in ((m.k, k), (m.v, v)):
        t = t.clone()
        to_bhnd(t, m.seq_dims["k"])[:, :, t0 + 1:] += 3.0
        env[node] = t
    _, (o2,) = _replay(tr, bound, [m.out], env)        # the same draws as the replay that gave ``o``
    o2 = to_bhnd(o2, m.seq_dims["out"])
    if not torch.allclose(o[:, :, :t0 + 1].float(), o2[:, :, :t0 + 1].float(), rtol=1e-3, atol=1e-5):
        return (f"attention is not causal: the output at position {t0} changes with the keys/values after it "
                f"(MoBA is causal; N={N})")
    return None


def _diagnose(q, k, v, o, bs, top_ks, dtype) -> Optional[str]:
    N = q.shape[2]
    for top_k in top_ks:
        for padded in (False, True):
            if mismatch(o, variant(q, k, v, bs, top_k, force_own=False, padded=padded), dtype) is None:
                return (f"the query's own block is not forced into the selection: it competes with the past "
                        f"blocks by score, MoBA always keeps it (block_size={bs}, top_k={top_k}, N={N})")
    nb = -(-N // bs)
    if nb > max(top_ks) and mismatch(o, variant(q, k, v, bs, nb), dtype) is None:
        return f"the output is dense causal attention: the top-{max(top_ks)} selection is not applied (N={N})"
    return None
