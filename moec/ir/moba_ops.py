"""MoBA's IR ops, registered into moec's one op registry (`moec.ir.ops.OPS`), with their interpreter
semantics and verifier rules.

Shapes: ``q [B, H, T, D]``, ``k``/``v [B, Hkv, T, D]`` (``T``: tokens per sequence, symbolic; ``B``:
batch, symbolic; ``H``, ``Hkv``, ``D`` concrete, ``H`` a multiple of ``Hkv``). Block ``j`` holds keys
``[j*bs, (j+1)*bs)`` (the last may be partial), so a sequence has ``ceiling(T/bs)`` blocks. The exact
definition of every op is `moec.moba.reference` (the interpreter below calls it).

Unfused (what the frontend lifts from eager code):

- ``block_pool(k) {block_size}``: ``pooled [B, Hkv, ceiling(T/bs), D]``, the mean of each block's keys
  over its real length (fp32 accumulation, stored in k's dtype).
- ``block_gate(q, pooled) {block_size, top_k}``: int32 ``indices [B, H, T, top_k]``: per query, its own
  block plus the ``top_k - 1`` past blocks ``j < t // bs`` with the highest ``q . pooled[j]`` (no scale;
  ties to the lower block), ascending, ``-1`` in unused slots. As written it scores every block: an
  ``N x blocks`` matrix.
- ``block_sparse_attention(q, k, v, indices) {block_size}``: ``out [B, H, T, D]`` (q's dtype) and the
  optional ``lse f32[B, H, T]``: one softmax (scale ``1/sqrt(D)``) over the union of the selected blocks,
  causal inside the own block.

Fused (made by the ``fuse-block-gate`` pass):

- ``fused_block_gate(q, k) {block_size, top_k, tiles}``: ``block_pool`` + ``block_gate`` as one kernel
  step: keys pooled once (``O(T D)``), then the gate kernel keeps a running top-k per query tile while
  pooled-key tiles stream past; only the indices reach memory.

``tiles`` (set by ``choose-moba-tiles``) is ``{None: MobaGateTile(...)}`` / ``{None:
MobaAttentionTile(...)}``: one bucket, every T.
"""
from __future__ import annotations

import sympy
import torch

from moec.moba import reference

from .interp import impl
from .ops import REQUIRED, IRError, op
from .tiles import MobaAttentionTile, MobaGateTile
from .types import B, TensorType
from .verify import RULES


def _seq(t: TensorType) -> tuple:
    if t.rank != 4:
        raise IRError(f"expected a [B, heads, T, D] tensor, got {t}")
    return t.shape


def _infer_pool(o, a):
    b, h, n, d = _seq(o["k"])
    return {"pooled": TensorType(o["k"].dtype, (b, h, sympy.ceiling(n / a["block_size"]), d))}


def _indices(q: TensorType, a) -> TensorType:
    b, h, n, _ = _seq(q)
    return TensorType("i32", (b, h, n, a["top_k"]))


def _infer_attention(o, a):
    b, h, n, _ = _seq(o["q"])
    return {"out": o["q"], "lse": TensorType("f32", (b, h, n))}


op("block_pool", "pooled[b, h, j] = mean of block j's keys over its real length (fp32 sum, k's dtype).",
   ["k"], ["pooled"], _infer_pool, attrs={"block_size": REQUIRED})
op("block_gate", "Per query t: its own block t // bs plus the top_k-1 past blocks by q_t . pooled[j] "
   "(ties: lower block), int32 ascending, -1 unused. Scores every block (N x blocks).",
   ["q", "pooled"], ["indices"], lambda o, a: {"indices": _indices(o["q"], a)},
   attrs={"block_size": REQUIRED, "top_k": REQUIRED})
op("fused_block_gate", "block_pool + block_gate as one kernel step: pooled keys, then a running top-k per "
   "query tile in registers; never an N x blocks score matrix in memory.",
   ["q", "k"], ["indices"], lambda o, a: {"indices": _indices(o["q"], a)},
   attrs={"block_size": REQUIRED, "top_k": REQUIRED, "tiles": None})
op("block_sparse_attention", "Causal softmax attention (scale 1/sqrt(D)) of each query over the union of "
   "the blocks indices lists for it; out in q's dtype, lse (natural log-sum-exp) in fp32.",
   ["q", "k", "v", "indices"], ["out", "lse"], _infer_attention, optional_results=["lse"],
   attrs={"block_size": REQUIRED, "tiles": None})


# ---- verifier rules ----------------------------------------------------------------------------

def _heads_ok(q: TensorType, kv: TensorType, what: str) -> None:
    bq, h, nq, d = _seq(q)
    bk, hkv, nk, dk = _seq(kv)
    if bq != bk or nq != nk and what != "pooled" or d != dk:
        raise IRError(f"{what} {kv} does not match q {q}")
    if not (isinstance(h, sympy.Integer) and isinstance(hkv, sympy.Integer)) or int(hkv) < 1 or int(h) % int(hkv):
        raise IRError(f"query heads {h} must be a multiple of the kv heads {hkv}")


def _attr_ints(n, *names) -> None:
    for name in names:
        v = n.attr[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise IRError(f"{name} must be a positive int, got {v!r}")


def _tile_ok(n, kind) -> None:
    tiles = n.attr.get("tiles")
    if tiles is not None and (list(tiles) != [None] or not isinstance(tiles[None], kind)):
        raise IRError(f"tiles must be {{None: {kind.__name__}(...)}}, got {tiles!r}")


def _pool_rule(n, types):
    _attr_ints(n, "block_size")


def _gate_rule(n, types):
    _attr_ints(n, "block_size", "top_k")
    q = types[n.ins["q"]]
    other = "pooled" if n.op == "block_gate" else "k"
    _heads_ok(q, types[n.ins[other]], other)
    if n.op == "fused_block_gate":
        _tile_ok(n, MobaGateTile)


def _attention_rule(n, types):
    _attr_ints(n, "block_size")
    q = types[n.ins["q"]]
    for r in ("k", "v"):
        _heads_ok(q, types[n.ins[r]], r)
    if types[n.ins["k"]] != types[n.ins["v"]] or types[n.ins["k"]].dtype != q.dtype:
        raise IRError("k and v must have one type, and q's dtype")
    idx = types[n.ins["indices"]]
    if idx.dtype != "i32" or idx.rank != 4 or idx.shape[:3] != q.shape[:3]:
        raise IRError(f"indices {idx} must be i32[B, H, T, K] like q {q}")
    _tile_ok(n, MobaAttentionTile)


RULES.update({"block_pool": _pool_rule, "block_gate": _gate_rule, "fused_block_gate": _gate_rule,
                     "block_sparse_attention": _attention_rule})


# ---- interpreter semantics (the eager reference) ----------------------------------------------

@impl("block_pool")
def _pool(n, v, ctx):
    k, bs = v["k"], n.attr["block_size"]
    pooled = [reference.pooled_keys(k[b], bs) for b in range(k.shape[0])]
    nb = -(-k.shape[2] // bs)
    out = torch.stack(pooled) if pooled else k.new_zeros(0, k.shape[1], nb, k.shape[3])
    return {"pooled": out.to(k.dtype)}


def select_from_pooled(q: torch.Tensor, pooled: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """`moec.moba.reference.moba_block_selection` given the block representatives (``pooled [B, Hkv, NB,
    D]``) instead of the keys: the same scores, eligibility, tie and NaN rules."""
    B_, H, N, _ = q.shape
    G = H // pooled.shape[1]
    nb = pooled.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    idx = torch.full((B_, H, N, top_k), -1, dtype=torch.int32, device=q.device)
    if N == 0:
        return idx
    s = q.to(cdt) @ pooled.to(cdt).repeat_interleave(G, 1).transpose(-1, -2)          # [B, H, N, nb]
    own = torch.arange(N, device=q.device) // block_size
    past = torch.arange(nb, device=q.device)[None, :] < own[:, None]
    key = torch.nan_to_num(s, nan=float("inf"), posinf=float("inf"), neginf=-reference.FLT_MAX)
    key = torch.where(past, key, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    k1 = min(top_k - 1, nb)
    chosen = order[..., :k1]
    valid = torch.gather(past.expand(B_, H, N, nb), -1, chosen)
    sel = torch.cat([torch.where(valid, chosen, nb), own.expand(B_, H, N)[..., None]], -1)
    sel = torch.sort(sel, dim=-1).values
    idx[..., :k1 + 1] = torch.where(sel == nb, -1, sel).to(torch.int32)
    return idx


@impl("block_gate")
def _gate(n, v, ctx):
    return {"indices": select_from_pooled(v["q"], v["pooled"], n.attr["block_size"], n.attr["top_k"])}


@impl("fused_block_gate")
def _fused_gate(n, v, ctx):
    return {"indices": reference.moba_block_selection(v["q"], v["k"], block_size=n.attr["block_size"],
                                                      top_k=n.attr["top_k"])}


@impl("block_sparse_attention")
def _attention(n, v, ctx):
    out, lse = reference.moba_attention_from_indices(v["q"], v["k"], v["v"], v["indices"],
                                                     block_size=n.attr["block_size"])
    return {"out": out, "lse": lse.float()}
