"""Find the MoBA core in a shape-specialised fx graph (`moec.frontend.trace`): a pattern -> proposal.

What is matched, whatever the spelling (function or method, matmul or einsum, reshape or unfold or
a loop of slices), anchored on the one ``topk`` of the gate:

1. **gate scores**: the ``topk`` input is, through masking (``masked_fill``, ``where``, ``+ mask``,
   in-place writes), a matmul/einsum ``S`` of a query-side operand and a **pooled-key** operand:
   a ``mean`` (or ``sum``, the same ranking) over a block axis, made by ``reshape``/``view`` (after a
   ``pad``), ``unfold``, or a ``cat`` of per-block slice means (consecutive blocks covering the keys),
   perhaps divided by per-block counts.
   ``amax``/``max`` pooling is named and rejected. The block size is read there (the reduced axis, or
   the slice bounds; one slice covering every key only bounds it from below).
2. **attention**: the first ``softmax`` or ``scaled_dot_product_attention`` downstream of the
   selection (also through in-place writes: ``gate[picked] = 0`` then ``qk += gate``). For a softmax,
   its input is (through masking and a constant scale) a matmul/einsum of queries and keys, and its
   output is multiplied by the values.
3. **boundaries**: the query the gate reads and the query the attention reads must meet in one node
   (following layout ops, casts and constant scales); so must the keys that are pooled and the keys
   attended. From the meeting node outwards the boundary is the innermost 4-D ``[B, h, N, D]`` or
   ``[B, N, h, D]`` tensor, or 3-D ``[N, h, D]`` (one packed sequence), preferring a further-out one
   with fewer heads (GQA repeats stay inside the core). The values are followed the same way from the
   attention (in the queries' dtype where the chain has it, before a cast to fp32).
4. **closure**: the core = everything the attention output needs that the boundaries do not
   provide. It may create constants (``arange``, masks) but must not read another input, a
   parameter or buffer, or call a submodule; nothing inside may be used outside it (e.g. returned
   attention weights; a cast nobody reads does not count), and it must not write into its inputs.

Each ``topk`` may anchor a core (a loop over packed sequences has one per sequence). Each result
proposes ``q``, ``k``, ``v``, the output node, the block size and the ``topk`` count;
semantics (own block forced, causal, the softmax scale, whether ``topk`` counts the own block) are
the probe's to confirm (`moec.frontend.moba_probe`). `NotMoba` means nothing MoBA-shaped is there;
`Reject` that a MoBA-shaped core cannot be lifted, and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from .fx_ops import (CASTS, LAYOUT, MATMULS, RESHAPES, ancestors, arg, chain, data_operand, is_inplace, is_tensor,
                     op_name, operands, reach, resolve_attr, search, strip, val)
from .trace import Traced

# what may stand between a score matmul and its softmax / topk (masks, in-place writes, casts)
MASKING = {"masked_fill", "where", "add", "sub", "setitem"} | CASTS
# how block representatives are made (a cat/stack joins per-block ones)
REDUCE = {"mean", "sum", "amax", "max", "amin", "min", "logsumexp", "cat", "stack"}


class NotMoba(Exception):
    pass


class Reject(Exception):
    pass


@dataclass
class Pool:
    reduce: fx.Node            # the mean/sum/cat node
    keys: fx.Node              # the key tensor the blocks are cut from
    block_size: int
    n_blocks: int
    how: str
    start: int = 0             # a per-block slice: where it starts, the length of the sliced dim, which dim
    length: int = 0
    dim: int = -1
    open: bool = False         # one block covering every key: the block size is only known to be >= this


def _norm_dim(d, rank):
    if isinstance(d, (list, tuple)):
        if len(d) != 1:
            raise Reject(f"block pooling reduces over several dims {tuple(d)}")
        d = d[0]
    return d % rank if isinstance(d, int) else None


def read_pool(r: fx.Node) -> Pool:
    """Block size, block count and key tensor of a pooling reduction (raises Reject with the cause)."""
    k = op_name(r)
    if k in ("amax", "max", "amin", "min", "logsumexp"):
        raise Reject(f"block representatives are {k}-pooled keys ({r.name}); MoBA scores a block by its "
                     "mean key")
    if k in ("cat", "stack"):
        parts = arg(r, 0, "tensors")
        pools = [read_pool(p) for p in parts] if parts else []
        if not pools or any(p.how != "slice" or p.keys is not pools[0].keys or p.dim != pools[0].dim for p in pools):
            raise NotMoba(f"{r.name} concatenates something other than per-block key means")
        bs, L = pools[0].block_size, pools[0].length
        if any((p.start, p.start + p.block_size) != (i * bs, min((i + 1) * bs, L)) for i, p in enumerate(pools)) \
                or pools[-1].start + pools[-1].block_size != L:
            raise Reject(f"the key means {r.name} joins are not of consecutive blocks covering the keys")
        return Pool(r, pools[0].keys, bs, len(pools), "per-block slice means (a loop)", open=len(pools) == 1)
    x = strip(r.args[0])
    rank = val(x).dim() if is_tensor(x) else 0
    d = _norm_dim(arg(r, 1, "dim"), rank) if rank else None
    if d is None:
        raise NotMoba(f"{r.name} does not reduce one axis")
    if op_name(x) in RESHAPES and 0 < d:
        shape = val(x).shape
        return Pool(r, x.args[0], int(shape[d]), int(shape[d - 1]), f"{op_name(x)} into blocks + {k}")
    if op_name(x) == "unfold" and d == rank - 1:
        size, step = arg(x, 2, "size"), arg(x, 3, "step")
        if size != step:
            raise Reject(f"key windows overlap (unfold size {size}, step {step}); MoBA blocks do not")
        return Pool(r, x.args[0], int(size), int(val(x).shape[arg(x, 1, 'dimension') % (rank - 1)]),
                    f"unfold into blocks + {k}")
    idx = x.args[1] if op_name(x) == "getitem" and isinstance(x.args[1], tuple) else (x.args[1],) \
        if op_name(x) == "getitem" else ()
    if d < len(idx):
        s = idx[d]
        L = int(val(x.args[0]).shape[d]) if is_tensor(x.args[0]) else None
        if isinstance(s, slice) and isinstance(s.start or 0, int) and isinstance(s.stop, int) and L is not None \
                and s.step in (None, 1):
            lo, hi = slice(s.start, s.stop).indices(L)[:2]
            return Pool(r, x.args[0], hi - lo, 1, "slice", start=lo, length=L, dim=d, open=(lo, hi) == (0, L))
    raise NotMoba(f"{r.name} ({k} over dim {d} of {op_name(x)}) is not a mean over key blocks")


@dataclass
class CoreMatch:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    seq_dims: dict               # role -> index of the sequence dim (1 or 2; 0 in an unbatched [N, h, D])
    block_size: int
    top_k_read: int
    n_blocks: int
    formulation: str
    nodes: set = field(default_factory=set)      # the core, replaced by moec's op
    open_block: bool = False     # one block of per-block slices covering every key: block size >= block_size

    def fits(self, block_size: int) -> bool:
        """Whether this core computes MoBA with ``block_size`` (a core of one open block: any size >= its own)."""
        return self.block_size == block_size or (self.open_block and self.block_size <= block_size)

    def fingerprint(self) -> tuple:
        """The core's op sequence with its semantic constants (floats, bools, dims, dtypes, the ints of
        other ops than sizes': scales, fills, axes, a ``tril`` diagonal), without the shape-derived ints
        (every int of a sizing op: views, pads, slices, factories; elsewhere an int that is one of the
        core's sizes or a multiple of the block size, from 4 up), plus the block size and whether ``topk``
        selects some or all of the blocks. Equal fingerprints at two sequence lengths mean the same
        computation with the sizes substituted."""
        order = {n: i for i, n in enumerate(self.out.graph.nodes)}
        nodes = sorted(self.nodes, key=order.get)
        sizes = {int(d) for n in nodes + [self.q, self.k, self.v] if isinstance(val(n), torch.Tensor)
                 for d in val(n).shape}
        top = max(sizes, default=0) + self.block_size
        sizes |= set(range(self.block_size, top + 1, self.block_size))

        def semantic(n, a):
            sizing = op_name(n) in SIZING
            if isinstance(a, (list, tuple)):
                return tuple(semantic(n, x) for x in a)
            if isinstance(a, dict):
                return tuple((k, semantic(n, v) if k not in ("dim", "dims") else v) for k, v in sorted(a.items()))
            if isinstance(a, (bool, float, str, torch.dtype)):
                return a
            if isinstance(a, int):
                return "." if sizing and a >= 0 or (a >= 4 and a in sizes) else a
            return "." if a is None or isinstance(a, slice) else "%"
        ops = tuple((n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "?"),
                     semantic(n, n.args), semantic(n, n.kwargs)) for n in nodes)
        regime = "all blocks" if self.top_k_read >= self.n_blocks else self.top_k_read
        return ops + (("block_size", "open" if self.open_block else self.block_size), ("topk", regime))


# ops whose int arguments are sizes, positions or counts (they follow the sequence length)
SIZING = frozenset({"view", "reshape", "expand", "pad", "arange", "zeros", "ones", "full", "empty", "new_zeros",
                    "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like", "empty_like",
                    "narrow", "split", "chunk", "unflatten", "getitem", "setitem", "unfold", "eye", "tril_indices",
                    "triu_indices", "linspace", "repeat", "topk"})


def _seq_dim(n, D, n_blocks, bs, prefer=2) -> Optional[int]:
    """The sequence dim of a ``[B, h, N, D]`` / ``[B, N, h, D]`` float tensor (2 / 1: when both fit, heads
    and N both in the block count's range, ``prefer``) or of one packed sequence ``[N, h, D]`` (0), else None."""
    t = val(n)
    if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or not t.is_floating_point() or t.shape[-1] != D:
        return None
    dims = (0,) if t.dim() == 3 else (prefer, 3 - prefer)
    fits = [d for d in dims if -(-t.shape[d] // bs) == n_blocks]
    return fits[0] if fits else None


def heads(t: torch.Tensor, seq_dim: int) -> int:
    """The head count of a core tensor whose sequence dim is ``seq_dim``."""
    return int(t.shape[1] if t.dim() == 3 else t.shape[3 - seq_dim])


def _boundary(nodes: list, D, nb, bs, N=None, prefer=2, dtype=None) -> tuple[fx.Node, int]:
    """The innermost core-shaped tensor of ``nodes`` (a chain, inside out), of ``dtype`` where one is (the
    values before a cast to fp32 the queries and keys do not share), preferring fewer heads (GQA repeats)."""
    cands = [(n, s) for n in nodes if (s := _seq_dim(n, D, nb, bs, prefer)) is not None and op_name(n) != "pad"
             and (N is None or val(n).shape[s] == N)]        # a pad that pads nothing is its input
    if dtype is not None and any(val(n).dtype == dtype for n, _ in cands):
        cands = [(n, s) for n, s in cands if val(n).dtype == dtype]
    if not cands:
        raise Reject(f"no [B, heads, N, D={D}] tensor where the core starts ({nodes[0].name})")
    best, s = cands[0]
    h = heads(val(best), s)
    for n, sd in cands[1:]:
        t = val(n)
        if t.dim() == val(best).dim() and heads(t, sd) < h and t.dtype == val(best).dtype \
                and t.shape[sd] == val(best).shape[s]:
            best, s, h = n, sd, heads(t, sd)
    return best, s


def _meet(a: fx.Node, b: fx.Node, what: str) -> list[fx.Node]:
    """The chain from the first node the chains of ``a`` and ``b`` share, outwards."""
    ca, cb = chain(a), chain(b)
    for i, n in enumerate(cb):
        if n in ca:
            return cb[i:]
    raise Reject(f"the gate and the attention read different {what} ({ca[-1].name} vs {cb[-1].name})")


def match(tr: Traced, prefer: Optional[dict] = None) -> list[CoreMatch]:
    """The MoBA cores of ``tr``, in graph order (several where a loop over packed sequences runs one per
    sequence); ``prefer`` (role -> sequence dim) settles layouts that shapes leave open (as many heads as
    tokens). Raises the first `Reject` (else `NotMoba`) when no ``topk`` anchors a core."""
    topks = [n for n in tr.graph.nodes if op_name(n) == "topk"]
    if not topks:
        raise NotMoba("no topk in forward")
    first: Optional[Exception] = None
    cores: list[CoreMatch] = []
    for tk in topks:
        if any(tk in c.nodes for c in cores):
            continue
        try:
            cores.append(_match_one(tr, tk, prefer or {}))
        except (NotMoba, Reject) as e:
            first = first if isinstance(first, Reject) else e
    if not cores:
        raise first
    if any(a.nodes & b.nodes for i, a in enumerate(cores) for b in cores[i + 1:]):
        raise Reject("two MoBA cores share nodes (one gate feeding two attentions?)")
    return cores


def _attention(tr: Traced, tk: fx.Node, gate_q: fx.Node):
    """``(q operand, k operand, v operand, output node, how)`` of the attention fed by the selection."""
    desc = _downstream(tr, tk)
    att = next((n for n in tr.graph.nodes if n in desc and tr.kind(n) in ("softmax", "sdpa")), None)
    if att is None:
        raise Reject("the selected blocks feed no softmax or scaled_dot_product_attention")
    if op_name(att) == "sdpa":
        if arg(att, 4, "dropout_p", 0.0):
            raise Reject("attention dropout inside the MoBA core (dropout_p > 0)")
        qa, ka, va = (arg(att, i, nm) for i, nm in enumerate(("query", "key", "value")))
        return qa, ka, va, att, "a token mask + scaled_dot_product_attention"
    if att.op == "call_module":
        raise Reject(f"softmax module {att.target} inside the core")
    dim = arg(att, 1, "dim", None)
    if dim is not None and dim not in (-1, val(att).dim() - 1):
        raise Reject(f"softmax over dim {dim}, not over the keys")
    scores = search(att.args[0], MASKING, MATMULS)
    if scores is None:
        raise Reject(f"the softmax input ({att.args[0].name}) is not a q . k score")
    ops = operands(scores)
    gq = set(chain(gate_q))
    qside = [o for o in ops if set(chain(o)) & gq]
    if len(ops) != 2 or len(qside) != 1:
        raise Reject(f"cannot tell queries from keys in the attention scores {scores.name}")
    qa, ka = qside[0], next(o for o in ops if o is not qside[0])
    out, todo = None, list(att.users)
    while todo and out is None:
        u = todo.pop(0)
        if tr.kind(u) == "dropout":
            training = arg(u, 2, "training", True) if u.op != "call_module" else resolve_attr(tr.root, u.target).training
            if training and (arg(u, 1, "p", 0.5) if u.op != "call_module" else resolve_attr(tr.root, u.target).p):
                raise Reject("attention dropout inside the MoBA core")
            todo += list(u.users)
        elif op_name(u) in CASTS:
            todo += list(u.users)
        elif op_name(u) in MATMULS:
            out = u
    if out is None:
        raise Reject("the attention probabilities are not multiplied by values")
    va = next((o for o in operands(out) if att not in chain(o) and not (set(chain(o)) & set(chain(att)))), None)
    if va is None:
        raise Reject(f"no value operand in {out.name}")
    gathered = any(op_name(n) in ("getitem", "gather", "index_select", "take_along_dim") and is_tensor(n.args[0])
                   and tk in ancestors(n) for n in chain(ka))
    how = "gathered key/value blocks" if gathered else "a dense token mask"
    return qa, ka, va, out, how + " + softmax attention"


def _downstream(tr: Traced, start: fx.Node) -> set:
    """What depends on ``start``, also through in-place writes: ``gate[picked] = 0`` makes the later
    readers of ``gate`` depend on ``picked``."""
    order = {n: i for i, n in enumerate(tr.graph.nodes)}

    def edges(n):
        out = list(n.users)
        if is_inplace(n) and n.args and isinstance(n.args[0], fx.Node):
            out += [u for u in n.args[0].users if order[u] > order[n]]
        return out
    return reach([start], edges)


def _output(out: fx.Node, q: fx.Node, qs: int, prefer: int) -> tuple[fx.Node, int]:
    """The attention output in a ``[B, H, N, D]`` or ``[B, N, H, D]`` layout matching q's sizes."""
    want = tuple(val(q).shape)
    swapped = (want[0], want[2], want[1], want[3]) if len(want) == 4 else want
    layouts = {swapped: 3 - qs, want: qs} if want != swapped else {want: prefer if len(want) == 4 else qs}
    n = out
    while True:
        t = val(n)
        if isinstance(t, torch.Tensor) and tuple(t.shape) in layouts:
            return n, layouts[tuple(t.shape)]
        users = list(n.users)
        if len(users) != 1 or data_operand(users[0]) is not n:
            raise Reject(f"the attention output {out.name} has shape {list(val(out).shape)}, not q's "
                         f"{list(want)} (or with heads and sequence swapped)")
        n = users[0]


def _closure(tr: Traced, bounds: list, out: fx.Node) -> set:
    outer = set().union(*(ancestors(b) for b in bounds))
    core = {n for n in ancestors(out) if n not in outer}
    grew = True
    while grew:                                # in-place writes into core tensors (and what they write) belong
        grew = False                           # to the core: ``gate[picked] = 0`` reads the selection
        for n in tr.graph.nodes:
            if is_inplace(n) and n not in core and n.args and n.args[0] in core:
                core |= {a for a in ancestors(n) if a not in outer}
                grew = True
            elif is_inplace(n) and n.args and n.args[0] in bounds:
                raise Reject(f"{n.name} writes into the core's input {n.args[0].name} in place")
    params = {id(t) for t in tr.root.parameters()} | {id(t) for t in tr.root.buffers()}
    for n in core:
        if n.op == "placeholder":
            raise Reject(f"the attention also reads the forward argument {n.target!r} (e.g. a mask or bias)")
        if n.op == "get_attr" and id(resolve_attr(tr.root, n.target)) in params:
            raise Reject(f"the attention also reads the module's tensor {n.target!r}")
        if n.op == "call_module":
            raise Reject(f"the attention calls the submodule {n.target!r}")
        if n is not out and any(u not in core and not _dead(u) for u in n.users):
            used = next(u for u in n.users if u not in core and not _dead(u))
            raise Reject(f"{n.name} inside the MoBA core is also used outside it (by {used.name}; e.g. "
                         "returned scores or weights)")
    return core


def _dead(n: fx.Node) -> bool:
    """Whether ``n`` is a cast or view nothing reads (``k_ = k_.type_as(k)``, never used again)."""
    return op_name(n) in LAYOUT and not is_inplace(n) and all(_dead(u) for u in n.users)


def _boundaries(gate_q, qa, ka, va, pool: Pool, D: int, pq: int, prefer: dict):
    bs, nb = pool.block_size, pool.n_blocks
    q, qs = _boundary(_meet(gate_q, qa, "queries"), D, nb, bs, None, pq)
    N = val(q).shape[qs]
    k, ks = _boundary(_meet(pool.keys, ka, "keys"), D, nb, bs, N, prefer.get("k", qs))
    v, vs = _boundary(chain(va), D, nb, bs, N, prefer.get("v", qs), val(q).dtype)
    tq, tk, tv = val(q), val(k), val(v)
    if tk.shape[ks] != tq.shape[qs] or tuple(tk.shape) != tuple(tv.shape) or ks != vs or tk.dim() != tq.dim():
        raise Reject(f"keys {list(tk.shape)} and values {list(tv.shape)} do not match queries {list(tq.shape)}")
    hq, hk = heads(tq, qs), heads(tk, ks)
    if hk < 1 or hq % hk:
        raise Reject(f"query heads ({hq}) are not a multiple of the key heads ({hk})")
    return q, k, v, (qs, ks, vs)


def _match_one(tr: Traced, tk: fx.Node, prefer: dict) -> CoreMatch:
    k_read, dim, largest = arg(tk, 1, "k"), arg(tk, 2, "dim", -1), arg(tk, 3, "largest", True)
    if not isinstance(k_read, int):
        raise Reject(f"the top-k count of {tk.name} is not a constant ({k_read!r})")
    rank = val(tk.args[0]).dim() if is_tensor(tk.args[0]) else 0
    if not rank or dim not in (-1, rank - 1):
        raise NotMoba(f"{tk.name} does not select along the last dim")
    scores = search(tk.args[0], MASKING, MATMULS)
    if scores is None:
        raise NotMoba(f"the input of {tk.name} is not a matmul/einsum score")
    pooled = [(o, search(o, {"div", "mul"}, REDUCE)) for o in operands(scores)]     # (sums / counts: means)
    pooled = [(o, r) for o, r in pooled if r is not None]
    if len(pooled) != 1 or len(operands(scores)) != 2:
        raise NotMoba(f"the scores {scores.name} do not compare queries with block-pooled keys")
    if not largest:
        raise Reject(f"{tk.name} selects the lowest-scoring blocks (largest=False)")
    pool = read_pool(pooled[0][1])
    gate_q = next(o for o in operands(scores) if o is not pooled[0][0])
    qa, ka, va, out, how = _attention(tr, tk, gate_q)
    D = int(val(gate_q).shape[-1])
    bs, nb = pool.block_size, pool.n_blocks
    tries = [prefer["q"]] if "q" in prefer else [2, 1]         # as many heads as tokens: try both
    for i, pq in enumerate(tries):
        try:
            q, k, v, (qs, ks, vs) = _boundaries(gate_q, qa, ka, va, pool, D, pq, prefer)
            break
        except Reject:
            if i + 1 == len(tries):
                raise
    out, os_ = _output(out, q, qs, prefer.get("out", qs))
    core = _closure(tr, [q, k, v], out)
    what = f"MoBA core: block means by {pool.how}, top-k of the scores, {how}"
    return CoreMatch(q, k, v, out, {"q": qs, "k": ks, "v": vs, "out": os_}, bs, k_read, nb, what, core, pool.open)
