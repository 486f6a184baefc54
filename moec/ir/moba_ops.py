"""MoBA's IR ops, registered into moec's one op registry (`moec.ir.ops.OPS`), with their interpreter
semantics and verifier rules.

Shapes: ``q [B, H, T, D]``, ``k``/``v [B, Hkv, T, D]`` (``T``: tokens per sequence, symbolic; ``B``:
batch, symbolic; ``H``, ``Hkv``, ``D`` concrete, ``H`` a multiple of ``Hkv``). Block ``j`` holds keys
``[j*bs, (j+1)*bs)`` (the last may be partial), so a sequence has ``ceiling(T/bs)`` blocks. The exact
definition of every op is `moec.moba.reference` (the interpreter below calls it).

Packed sequences: with the optional operand ``cu_seqlens`` (``i32[S + 1]``, ``B = 1``) the ``T`` rows hold
``S`` sequences; blocks restart at each sequence start and block numbers in ``indices`` count from it.
Pooled keys are then packed: sequence ``s``'s blocks are rows ``offsets[s] + j`` of ``ceiling(T/bs) + S``
rows (an upper bound; ``offsets[s]`` = the blocks of the sequences before it). The optional
``kconv_weight [Hkv, D, kc]`` convolves the keys causally before pooling (routing only).

Unfused (what the frontend lifts from eager code):

- ``block_pool(k) {block_size}``: ``pooled [B, Hkv, ceiling(T/bs), D]``, the mean of each block's keys
  over its real length (fp32 accumulation, stored in k's dtype).
- ``block_gate(q, pooled) {block_size, top_k}``: int32 ``indices [B, H, T, top_k]``: per query, its own
  block plus the ``top_k - 1`` past blocks ``j < t // bs`` with the highest ``q . pooled[j]`` (no scale;
  ties to the lower block), ascending, ``-1`` in unused slots. As written it scores every block: an
  ``N x blocks`` matrix.
- ``block_sparse_attention(q, k, v, indices) {block_size, scheme}``: ``out [B, H, T, D]`` (q's dtype) and
  the optional ``lse f32[B, H, T]``: one softmax (scale ``1/sqrt(D)``) over the union of the selected
  blocks, causal inside the own block. ``scheme`` ("auto", "rows", "densify") is how the kernels should
  compute it; the ``choose-moba-scheme`` pass settles it.

Fused and scheduled (made by the passes):

- ``fused_block_gate(q, k) {block_size, top_k, tiles}``: ``block_pool`` + ``block_gate`` as one kernel
  step: keys pooled once (``O(T D)``), then the gate kernel keeps a running top-k per query tile while
  pooled-key tiles stream past; only the indices reach memory.
- ``block_sparse_attention {scheme='rows'}``: query-tile-major, the union of the tile's blocks with row
  masks (short sequences).
- ``block_sparse_attention {scheme='densify'}``: FlashMoBA's collect and densify with window ownership
  (long sequences): per window of consecutive rows, the rows that selected each block (past or their
  own, causal there) gathered into dense tiles, the window's online-softmax state carried from block to block.
  No partial results in the IR: one node, the same ``out, lse``.

``tiles`` (set by ``choose-tiles``) is ``{None: MobaGateTile(...)}`` / ``{None: MobaAttentionTile(...)}``:
one bucket, every T.
"""
from __future__ import annotations

import sympy
import torch

from moec.moba import reference

from .interp import impl
from .ops import KERNEL_ATTRS, REQUIRED, IRError, op
from .tiles import MobaAttentionTile, MobaGateTile
from .types import TensorType
from .verify import RULES

SCHEMES = ("auto", "rows", "densify")
VARLEN = ["cu_seqlens"]            # the optional operand of packed sequences


def _seq(t: TensorType) -> tuple:
    if t.rank != 4:
        raise IRError(f"expected a [B, heads, T, D] tensor, got {t}")
    return t.shape


def _blocks(o, a):
    """Pooled-key rows: ``ceiling(T/bs)``, plus one per sequence when packed (an upper bound)."""
    n = _seq(o["k"])[2]
    nb = sympy.ceiling(n / a["block_size"])
    return nb + o["cu_seqlens"].shape[0] - 1 if "cu_seqlens" in o else nb


def _infer_pool(o, a):
    b, h, _, d = _seq(o["k"])
    return {"pooled": TensorType(o["k"].dtype, (b, h, _blocks(o, a), d))}


def _indices(q: TensorType, a) -> TensorType:
    b, h, n, _ = _seq(q)
    return TensorType("i32", (b, h, n, a["top_k"]))


def _infer_attention(o, a):
    b, h, n, _ = _seq(o["q"])
    return {"out": o["q"], "lse": TensorType("f32", (b, h, n))}


op("block_pool", "pooled[b, h, j] = mean of block j's (convolved) keys over its real length (fp32 sum, k's dtype).",
   ["k"], ["pooled"], _infer_pool, optional_operands=VARLEN + ["kconv_weight"], attrs={"block_size": REQUIRED})
op("block_gate", "Per query t: its own block t // bs plus the top_k-1 past blocks by q_t . pooled[j] "
   "(ties: lower block), int32 ascending, -1 unused. Scores every block (N x blocks).",
   ["q", "pooled"], ["indices"], lambda o, a: {"indices": _indices(o["q"], a)}, optional_operands=VARLEN,
   attrs={"block_size": REQUIRED, "top_k": REQUIRED})
op("fused_block_gate", "block_pool + block_gate as one kernel step: pooled keys, then a running top-k per "
   "query tile in registers; never an N x blocks score matrix in memory.",
   ["q", "k"], ["indices"], lambda o, a: {"indices": _indices(o["q"], a)},
   optional_operands=VARLEN + ["kconv_weight"], attrs={"block_size": REQUIRED, "top_k": REQUIRED, **KERNEL_ATTRS})
op("block_sparse_attention", "Causal softmax attention (scale 1/sqrt(D)) of each query over the union of "
   "the blocks indices lists for it; out in q's dtype, lse (natural log-sum-exp) in fp32. scheme: how the "
   "kernels compute it (auto, rows: query tiles with row masks, densify: gathered rows per key block, window-owned softmax state).",
   ["q", "k", "v", "indices"], ["out", "lse"], _infer_attention, optional_operands=VARLEN, optional_results=["lse"],
   attrs={"block_size": REQUIRED, "scheme": "auto", **KERNEL_ATTRS})


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


def _varlen_ok(n, types) -> None:
    if "cu_seqlens" in n.ins:
        cu = types[n.ins["cu_seqlens"]]
        if cu.dtype != "i32" or cu.rank != 1:
            raise IRError(f"cu_seqlens {cu} must be i32[S + 1]")
    if "kconv_weight" in n.ins:
        w, k = types[n.ins["kconv_weight"]], _seq(types[n.ins["k"]])
        if w.rank != 3 or w.shape[:2] != (k[1], k[3]):
            raise IRError(f"kconv_weight {w} must be [Hkv, D, kc] of k {types[n.ins['k']]}")


def _pool_rule(n, types):
    _attr_ints(n, "block_size")
    _varlen_ok(n, types)


def _gate_rule(n, types):
    _attr_ints(n, "block_size", "top_k")
    q = types[n.ins["q"]]
    other = "pooled" if n.op == "block_gate" else "k"
    _heads_ok(q, types[n.ins[other]], other)
    _varlen_ok(n, types)
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
    if n.attr.get("scheme", "rows") not in SCHEMES:
        raise IRError(f"scheme must be one of {SCHEMES}, got {n.attr['scheme']!r}")
    _varlen_ok(n, types)
    _tile_ok(n, MobaAttentionTile)
    tiles = n.attr.get("tiles")
    if tiles is not None and n.attr.get("scheme") != "densify" and tiles[None].window:
        raise IRError(f"a window tile is for scheme 'densify' only, got {tiles[None]!r} with scheme "
                      f"{n.attr.get('scheme')!r}")
    if tiles is not None and n.attr.get("scheme") == "densify" and not tiles[None].window:
        raise IRError(f"scheme 'densify' needs a tile with a window, got {tiles[None]!r}")


RULES.update({"block_pool": _pool_rule, "block_gate": _gate_rule, "fused_block_gate": _gate_rule,
              "block_sparse_attention": _attention_rule})


# ---- interpreter semantics (the eager reference) ----------------------------------------------

def _segments(v, k) -> list:
    return reference.segments(k.shape[0], k.shape[2], v.get("cu_seqlens"))


@impl("block_pool")
def _pool(n, v, ctx):
    k, bs, w = v["k"], n.attr["block_size"], v.get("kconv_weight")
    B, Hkv, N, D = k.shape
    if "cu_seqlens" not in v:
        pooled = [reference.pooled_keys(k[b], bs, w) for b in range(B)]
        out = torch.stack(pooled) if pooled else k.new_zeros(0, Hkv, -(-N // bs), D)
        return {"pooled": out.to(k.dtype)}
    segs = _segments(v, k)
    out = k.new_zeros(1, Hkv, -(-N // bs) + len(segs), D)
    row = 0
    for _, a, e in segs:                          # sequence s's blocks at rows offsets[s] + j
        p = reference.pooled_keys(k[0, :, a:e], bs, w)
        out[0, :, row:row + p.shape[1]] = p.to(k.dtype)
        row += p.shape[1]
    return {"pooled": out}


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
    q, pooled, bs, top_k = v["q"], v["pooled"], n.attr["block_size"], n.attr["top_k"]
    if "cu_seqlens" not in v:
        return {"indices": select_from_pooled(q, pooled, bs, top_k)}
    idx = torch.full((*q.shape[:3], top_k), -1, dtype=torch.int32, device=q.device)
    row = 0
    for _, a, e in reference.segments(1, q.shape[2], v["cu_seqlens"]):
        nb = -(-(e - a) // bs)
        idx[:, :, a:e] = select_from_pooled(q[:, :, a:e], pooled[:, :, row:row + nb], bs, top_k)
        row += nb
    return {"indices": idx}


@impl("fused_block_gate")
def _fused_gate(n, v, ctx):
    return {"indices": reference.moba_block_selection(v["q"], v["k"], block_size=n.attr["block_size"],
                                                      top_k=n.attr["top_k"], cu_seqlens=v.get("cu_seqlens"),
                                                      kconv_weight=v.get("kconv_weight"))}


def _attend(v, n, indices):
    out, lse = reference.moba_attention_from_indices(v["q"], v["k"], v["v"], indices, block_size=n.attr["block_size"],
                                                     cu_seqlens=v.get("cu_seqlens"))
    return out, lse.float()


@impl("block_sparse_attention")
def _attention(n, v, ctx):
    out, lse = _attend(v, n, v["indices"])
    return {"out": out, "lse": lse}
