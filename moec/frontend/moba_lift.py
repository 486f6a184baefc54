"""Lift MoBA cores out of modules (the candidates: `moec.frontend.moba_candidates`): analyse one (trace at
several sequence lengths, match, probe), and rewrite a specialised graph so the core becomes moec's op.

How a module is analysed (`analyse`, at compile time when inputs can be made up, else at its first
call, with the call's own arguments as the example):

1. trace ``forward`` specialised to the example (`moec.frontend.trace`) and find the core
   (`moec.frontend.moba_match`): q, k, v, the output, block size, the ``topk`` count;
2. vary the sequence length of the inputs (the input dims whose size is the core's N) and repeat
   at a length where the selection matters (``n_blocks > top_k``, a partial last block), the
   example's, one where ``N < block_size * top_k``, and N = 1; the block size must read the same
   at every length (else it is not a constant), and the probe (`moec.frontend.moba_probe`) must
   confirm the core computes `moba_reference` at each, which also fixes ``top_k``;
3. the result is a `LiftedMoba` (config, layouts, the probed op sequences) or `NotLiftedMoba`
   with the cause; None when the module holds nothing MoBA-shaped.

Packed sequences (MoBA's reference style: ``for i in range(len(cu_seqlens) - 1)`` with bounds read by
``.item()``): when the trace stops at such a read and the forward takes small integer tensors, it is
traced again knowing their values (`moec.frontend.trace`), so the loop unrolls into one core per
sequence, each ``[n_i, heads, D]``. The argument read must be sequence offsets (from 0, non-decreasing,
ending at the packed length); the probe packs two sequences (N and 3 tokens) at each length and every
core must compute MoBA with the same block size and top_k. At run time each new offsets value is
traced again (a host read, as eager's ``.item()``), and each core runs the kernels.

At run time each new call signature is traced and matched again (`specialise`); a graph whose op
sequence the probe has seen, with the same block size, is trusted, any other is probed at that
signature first (so a code path the analysis never saw never runs unconfirmed), and `rewrite`
replaces the core by a call to the region's op; the rest of the graph stays the user's PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import nn

from ..moba.config import MobaConfig
from .fx_ops import descendants, resolve_attr, val
from .moba_match import CoreMatch, NotMoba, Reject, heads, match
from .moba_probe import from_bhnd, probe, random_bound, to_bhnd
from .trace import Bound, TraceFailed, Traced, bind, host_candidates, signature, trace

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CORE = "_moec_moba_core"
PROBE_BUDGET = 1 << 22          # max B * H * N * N of the dense eager core on a probe input


@dataclass
class LiftedMoba:
    config: MobaConfig
    seq_dims: dict                       # role (q, k, v, out) -> its sequence dim (1 or 2)
    formulation: str
    k_offset: Optional[int]              # top_k - the topk count, where it selects some of the blocks
    fingerprints: set = field(default_factory=set)
    notes: list = field(default_factory=list)
    host: tuple = ()                     # arguments whose values forward reads (packed sequences' cu_seqlens)


@dataclass
class NotLiftedMoba:
    reason: str
    final: bool = True          # False: this call cannot tell (e.g. N = 1); analyse at a later call


# ----------------------------------------------------------------------------------------------
# analysis

def input_seq_dims(bound: Bound, N: int, skip=()) -> dict:
    """Per tensor argument (but those in ``skip``), the dim holding the sequence: the last non-final dim of
    size N (of a float tensor: its last dim holds features; an integer one's, positions, may be the last)."""
    out = {}
    for name, t in bound.tensors().items():
        dims = [d for d in range(t.dim() - (1 if t.is_floating_point() else 0)) if t.shape[d] == N]
        if dims and name not in skip:
            out[name] = dims[-1]
    return out


def _head_dims(m: CoreMatch) -> tuple[int, int, int, int]:
    tq, tk = val(m.q), val(m.k)
    qs, ks = m.seq_dims["q"], m.seq_dims["k"]
    return int(tq.shape[qs]), heads(tq, qs), heads(tk, ks), int(tq.shape[-1])


def _reads_values(e: TraceFailed) -> bool:
    return any(f"call_method {read}:" in str(e) for read in ("item", "tolist", "__index__", "__bool__"))


class _Samples:
    """Probe inputs at a chosen sequence length N: the example's tensors redrawn at random with their
    sequence dims resized. For a forward over packed sequences (``host``: it reads ``cu_seqlens``), two
    sequences of N and 3 tokens: ``cu_seqlens = [0, N, N + 3]``, the packed dims sized ``N + 3``, and an
    int argument named like ``max_seqlen`` and equal to the example's longest sequence set to N."""

    def __init__(self, bound: Bound, host: tuple, dims: dict, gen: torch.Generator):
        self.bound, self.host, self.dims, self.gen = bound, host, dims, gen

    def lengths(self, N: int) -> list[int]:
        return [N, 3] if self.host else [N]

    def at(self, N: int) -> Bound:
        if not self.host:
            return random_bound(self.bound, self.dims, N, self.gen)
        (cu_name,) = self.host
        cu = self.bound.values[self.bound.names.index(cu_name)]
        longest = max(torch.diff(cu.flatten()).tolist())
        new_cu = torch.tensor([0, N, N + 3], dtype=cu.dtype, device=cu.device)
        drawn = random_bound(self.bound, self.dims, N + 3, self.gen, keep=self.host)
        vals = [new_cu if n == cu_name else max(self.lengths(N)) if type(v) is int and v == longest and "max" in n
                else v for n, v in zip(drawn.names, drawn.values)]
        return Bound(drawn.names, tuple(vals))


def _packed(bound: Bound, host: tuple) -> Optional[str]:
    """Why the host-read arguments are not one ``cu_seqlens`` (1-D, from 0, non-decreasing, ending at a
    packed dim of the float inputs), or None when they are."""
    if len(host) != 1:
        return f"forward reads the values of several tensor arguments ({', '.join(host)})"
    cu = bound.values[bound.names.index(host[0])].flatten().cpu()
    sizes = {s for t in bound.tensors().values() if t.is_floating_point() for s in t.shape}
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((torch.diff(cu) < 0).any()) or int(cu[-1]) not in sizes:
        return (f"forward reads the values of {host[0]!r}, which are not sequence offsets (cu_seqlens: from 0, "
                "non-decreasing, ending at the packed length)")
    return None


def analyse(module: nn.Module, args: tuple, kwargs: dict) -> Union[LiftedMoba, NotLiftedMoba, None]:
    host: tuple = ()
    try:
        bound = bind(module, args, kwargs)
        if signature(module, bound) is None:        # before any trace: a cache object would record proxies
            return NotLiftedMoba("forward takes an argument moec cannot key a specialised graph by")
        try:
            tr = trace(module, bound)
        except TraceFailed as e:
            if not (_reads_values(e) and host_candidates(bound)):
                raise
            try:                                                   # a loop over packed sequences' offsets
                tr = trace(module, bound, host_candidates(bound))
            except TraceFailed as e2:
                if _reads_values(e2):
                    raise
                return NotLiftedMoba(f"forward could not be traced for this call's {', '.join(host_candidates(bound))} "
                                     f"values: {e2}", final=False)      # (eager code may fail on them too)
            host = tuple(sorted(tr.host_read))
    except TraceFailed as e:
        if _reads_values(e):
            return NotLiftedMoba(
                f"forward reads tensor values on the host ({e}): moec follows loops over the values of small "
                f"integer arguments (packed sequences' cu_seqlens read with .item()), not over computed data")
        return NotLiftedMoba(f"forward could not be traced (fx, shape-specialised): {e}")
    if host and (why := _packed(bound, host)):
        return NotLiftedMoba(why)
    try:
        cores = match(tr)
    except NotMoba:
        return None
    except Reject as e:
        return NotLiftedMoba(str(e))
    m = max(cores, key=lambda c: (not c.open_block, c.n_blocks))     # the core that shows the block size
    if m.open_block:
        return NotLiftedMoba(f"every sequence of this call fits in one block, so it cannot tell the block size "
                             f"(<= {m.block_size} tokens); the next call is analysed", final=False)
    N0, H, Hkv, D = _head_dims(m)
    B = int(val(m.q).shape[0]) if val(m.q).dim() == 4 else 1
    if host:
        cu = bound.values[bound.names.index(host[0])]
        total = int(cu.flatten()[-1])
        dims = input_seq_dims(bound, total, skip=host)
        if sum(t.shape[d] == total for n, t in bound.tensors().items() if n not in host
               for d in range(t.dim() - (1 if t.is_floating_point() else 0))) != len(dims):
            return NotLiftedMoba(f"this call cannot tell which input dim holds the {total} packed tokens; the "
                                 "next call is analysed", final=False)
    else:
        dims = input_seq_dims(bound, N0)
        if N0 < 2 or any(sum(t.shape[d] == N0 for d in range(t.dim() - 1)) > 1 for t in bound.tensors().values()):
            return NotLiftedMoba(f"this call cannot tell which input dim is the sequence (N={N0}); the next "
                                 "call is analysed", final=False)
    if not dims:
        return NotLiftedMoba(f"no input dim holds the sequence length {N0}, so the probe cannot vary it")
    bs, cap = m.block_size, max(2, int(math.sqrt(PROBE_BUDGET / max(1, B * H))))
    samples = _Samples(bound, host, dims, torch.Generator().manual_seed(0))
    top_k, k_read, seq_dims, probed, fps, other, offset = None, m.top_k_read, None, [], set(), [], None
    lengths = [_selection_length(module, samples, m, cap), N0, max(2, bs * max(k_read - 1, 1) - 3), 1]
    for N in dict.fromkeys(lengths):
        if N > cap:
            continue
        bN = samples.at(N)
        try:
            trN = trace(module, bN, host)
            cores = match(trN, seq_dims)
        except NotMoba:
            other.append(N)           # another code path (e.g. dense attention for short inputs)
            continue
        except (TraceFailed, Reject) as e:
            return NotLiftedMoba(f"at sequence length {N}: {e}")
        for mN in cores:
            if not mN.fits(bs):
                return NotLiftedMoba(f"the block size is not a constant: {bs} at N={N0}, {mN.block_size} at N={N}")
            if _head_dims(mN)[1:] != (H, Hkv, D) or (seq_dims is not None and mN.seq_dims != seq_dims):
                return NotLiftedMoba(f"the core's q/k/v shapes do not follow the sequence length (N={N})")
            seq_dims = mN.seq_dims
        got_lengths = sorted(_head_dims(c)[0] for c in cores)
        if got_lengths != sorted(samples.lengths(N)) if host else set(got_lengths) != {N}:
            return NotLiftedMoba(f"the cores' sequence lengths {[_head_dims(c)[0] for c in cores]} are not the "
                                 f"input's {samples.lengths(N)} (N={N}): one MoBA core per sequence expected")
        k_now = max(c.top_k_read for c in cores)
        cands = [top_k] if top_k is not None else [k_now, k_now + 1]
        got, why = probe(module, bN, trN, cores, cands)
        if got is None:
            return NotLiftedMoba(f"probe at N={N}: {why}")
        top_k = got
        for c in cores:
            if c.top_k_read < c.n_blocks:
                if offset is not None and offset != top_k - c.top_k_read:
                    return NotLiftedMoba(f"the topk count does not follow top_k={top_k} (N={N})")
                offset = top_k - c.top_k_read
        probed.append(N)
        fps |= {c.fingerprint() for c in cores}
    if top_k is None:
        return NotLiftedMoba(f"no probe length fits the probe budget (B={B}, H={H})")
    cfg = MobaConfig(bs, top_k, H, Hkv, D)
    dt = str(val(m.q).dtype).replace("torch.", "")
    notes = [f"boundaries at N={N0}: q {_desc(m.q)}, k {_desc(m.k)}, v {_desc(m.v)}; output {_desc(m.out)}",
             f"probe: the core matched moec's MoBA(block_size={bs}, top_k={top_k}) at N="
             f"{', '.join(map(str, probed))} ({dt}, random inputs)"]
    if host:
        notes.insert(0, f"packed sequences: forward loops over the values of {host[0]!r} (read with .item(): a host "
                        f"synchronisation, as in eager); one core per sequence, each running the kernels; a graph is "
                        f"traced per {host[0]} value")
    if other:
        notes.append(f"at N={', '.join(map(str, other))} forward takes a path without a MoBA core: such calls "
                     "run eagerly")
    what = m.formulation + (", one per packed sequence" if host else "")
    return LiftedMoba(cfg, seq_dims, what, offset, fps, notes, host)


def _selection_length(module, samples: _Samples, m: CoreMatch, cap: int) -> int:
    """A sequence length (within the probe budget) where ``topk`` selects some, not all, of the blocks,
    so the probe sees the selection: grown from the example's top-k count until the trace shows it."""
    bs, k = m.block_size, m.top_k_read
    N = min(cap, bs * (k + 3) + bs // 2 + 1)
    for _ in range(4):
        try:
            cores = match(trace(module, samples.at(N), samples.host), m.seq_dims)
        except (TraceFailed, NotMoba, Reject):
            return N
        mN = max(cores, key=lambda c: c.n_blocks)
        if mN.top_k_read < mN.n_blocks or N >= cap:
            return N
        k = mN.top_k_read
        N = min(cap, bs * (2 * k + 3) + bs // 2 + 1)
    return N


def _desc(n: fx.Node) -> str:
    return f"{n.name} {list(val(n).shape)}"


# ----------------------------------------------------------------------------------------------
# one call signature

def specialise(module: nn.Module, bound: Bound, lifted: LiftedMoba) -> Union[tuple[Traced, list], str]:
    """The traced graph and cores of this call, confirmed; else the reason it runs eagerly."""
    try:
        tr = trace(module, bound, lifted.host)
        cores = match(tr, lifted.seq_dims)
    except TraceFailed as e:
        return f"this call could not be traced: {e}"
    except (NotMoba, Reject) as e:
        return f"no liftable MoBA core in this call: {e}"
    cfg = lifted.config
    shapes = {_head_dims(m)[1:] for m in cores}
    dtypes = {val(n).dtype for m in cores for n in (m.q, m.k, m.v)}
    if len(shapes) > 1 or len({val(m.out).dtype for m in cores}) > 1:
        return "this call's cores differ in heads, head_dim or output dtype"
    for m in cores:
        if not m.fits(cfg.block_size) or m.seq_dims != lifted.seq_dims:
            return (f"this call's core differs from the lifted one (block size {m.block_size}, layouts "
                    f"{m.seq_dims})")
    if len(dtypes) > 1:
        return "q, k and v of the core differ in dtype"
    dtype, device = dtypes.pop(), tr.device
    if dtype not in _KERNEL_DTYPES or device.type not in ("cpu", "cuda"):
        return f"the core runs in {dtype} on {device.type} (kernels take fp32/fp16/bf16 on cpu/cuda)"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 on CPU (the Triton interpreter computes bf16 dots wrongly)"
    want_k = cfg.top_k - (lifted.k_offset or 0)
    for m in cores:
        if m.top_k_read != min(want_k, m.n_blocks) and not (m.top_k_read >= m.n_blocks and want_k >= m.n_blocks):
            return (f"this call selects top-{m.top_k_read} of {m.n_blocks} blocks; the lifted core was confirmed "
                    f"with top_k={cfg.top_k}")
        if lifted.k_offset is None and m.top_k_read < m.n_blocks:
            return "the probe only saw top-k select every block; this call selects some of them"
    unseen = [m for m in cores if m.fingerprint() not in lifted.fingerprints]
    if unseen:
        real = random_bound(bound, {}, 0, torch.Generator().manual_seed(1), keep=lifted.host)
        got, why = probe(module, real, tr, unseen, [cfg.top_k])
        if got is None:
            return f"probe of this call's graph (an op sequence not seen before): {why}"
        lifted.fingerprints |= {m.fingerprint() for m in unseen}
    return tr, cores


def rewrite(tr: Traced, cores: list, core: nn.Module) -> fx.GraphModule:
    """The traced forward with each core replaced by ``core(q, k, v)``; everything else unchanged."""
    g = tr.graph
    for m in cores:
        with g.inserting_before(m.out):
            new = g.call_module(CORE, (m.q, m.k, m.v))
        m.out.replace_all_uses_with(new)
        dropped = descendants([u for n in m.nodes for u in n.users if u not in m.nodes])  # unused casts of them
        for n in reversed([n for n in g.nodes if n in m.nodes or n in dropped]):
            g.erase_node(n)
    g.lint()
    targets = {n.target for n in g.nodes if n.op in ("get_attr", "call_module") and n.target != CORE}
    root = {t: resolve_attr(tr.root, t) for t in targets}
    root[CORE] = core
    return fx.GraphModule(root, g, class_name="MobaLiftedForward")


def eager_modules(gm: fx.GraphModule) -> list[str]:
    """The submodules the rewritten forward still calls (e.g. the projections)."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != CORE]


__all__ = ["LiftedMoba", "NotLiftedMoba", "analyse", "specialise", "rewrite", "to_bhnd", "from_bhnd", "eager_modules"]
