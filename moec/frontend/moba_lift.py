"""Lift MoBA cores out of modules: find candidates, analyse one (trace at several sequence lengths,
match, probe), and rewrite a specialised graph so the core becomes moec's op.

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

At run time each new call signature is traced and matched again (`specialise`); a graph whose op
sequence the probe has seen, with the same block size, is trusted, any other is probed at that
signature first (so a code path the analysis never saw never runs unconfirmed), and `rewrite`
replaces the core by a call to the region's op; the rest of the graph stays the user's PyTorch.
"""
from __future__ import annotations

import functools
import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import nn

from ..moba.config import MobaConfig
from .fx_ops import resolve_attr, val
from .moba_match import CoreMatch, NotMoba, Reject, match
from .moba_probe import probe_once, random_bound, to_bhnd
from .probe_harness import draw
from .trace import Bound, TraceFailed, Traced, bind, eager_forward, signature, trace

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


@dataclass
class NotLiftedMoba:
    reason: str
    final: bool = True          # False: this call cannot tell (e.g. N = 1); analyse at a later call


# ----------------------------------------------------------------------------------------------
# candidates

def _sources(fn, depth: int = 3, seen=None) -> list[str]:
    """The source of ``fn`` and of the Python functions it reaches by global name (a few levels)."""
    seen = set() if seen is None else seen
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType) or fn in seen:
        return []
    seen.add(fn)
    try:
        out = [inspect.getsource(fn)]
    except (OSError, TypeError):
        out = []
    if depth:
        names = set(fn.__code__.co_names)
        for const in fn.__code__.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        for name in names:
            obj = fn.__globals__.get(name)
            objs = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]
            for o in objs:
                out += _sources(o, depth - 1, seen)
    return out


def looks_like_moba(module: nn.Module) -> bool:
    """A cheap pre-filter: the class's ``forward`` (its user-defined bases' too), or a method or a
    global function it calls by name, uses both ``topk`` and a softmax / ``scaled_dot_product_attention``."""
    return _looks_like_moba(getattr(type(module), "_moec_base", type(module)))


@functools.lru_cache(maxsize=1024)
def _looks_like_moba(cls: type) -> bool:
    seen: set = set()
    text = []
    for c in cls.__mro__:
        fwd = vars(c).get("forward")
        if c.__module__.startswith("torch") or not isinstance(fwd, types.FunctionType):
            continue
        text += _sources(fwd, seen=seen)
        for name in fwd.__code__.co_names:                 # self.helper(...): methods of the class
            meth = getattr(cls, name, None)
            if isinstance(meth, types.FunctionType) and not meth.__module__.startswith("torch"):
                text += _sources(meth, seen=seen)
    src = "\n".join(text)
    return "topk" in src and ("softmax" in src or "scaled_dot_product_attention" in src)


def find_moba_modules(model: nn.Module, exclude=()) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, module)]`` of user-defined modules that look like MoBA (`looks_like_moba`),
    neither in ``exclude`` (the MoE candidates) or below one, nor holding one (a model around MoE
    layers is not a MoBA core; its attention modules are visited)."""
    skip = {id(m) for m in exclude}
    paths = [p for p, m in model.named_modules() if id(m) in skip]
    holders = {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)} | ({""} if paths else set())
    out = []

    def visit(prefix, m):
        if id(m) in skip:
            return
        if prefix not in holders and not type(m).__module__.startswith("torch.") and looks_like_moba(m):
            out.append((prefix, m))
        for name, child in m.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out


def synthesize_args(module: nn.Module, n: int = 37) -> Optional[tuple]:
    """``(x,)`` with ``x [2, n, d]`` when forward takes one required argument and the module's first
    ``nn.Linear`` reads ``d`` features; else None (the first call will be the example)."""
    params = [p for p in inspect.signature(eager_forward(module)).parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    lin = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    if len(params) != 1 or lin is None:
        return None
    w = lin.weight
    return (draw((2, n, lin.in_features), 0, w.dtype, w.device),)


# ----------------------------------------------------------------------------------------------
# analysis

def input_seq_dims(bound: Bound, N: int) -> dict:
    """Per tensor argument, the dim holding the sequence: the last non-final dim of size N."""
    out = {}
    for name, t in bound.tensors().items():
        dims = [d for d in range(t.dim() - 1) if t.shape[d] == N]
        if dims:
            out[name] = dims[-1]
    return out


def _head_dims(m: CoreMatch) -> tuple[int, int, int, int]:
    tq, tk = val(m.q), val(m.k)
    qs, ks = m.seq_dims["q"], m.seq_dims["k"]
    return int(tq.shape[qs]), int(tq.shape[3 - qs]), int(tk.shape[3 - ks]), int(tq.shape[3])


def analyse(module: nn.Module, args: tuple, kwargs: dict) -> Union[LiftedMoba, NotLiftedMoba, None]:
    try:
        bound = bind(module, args, kwargs)
        if signature(module, bound) is None:
            return NotLiftedMoba("forward takes an argument moec cannot key a specialised graph by")
        tr = trace(module, bound)
    except TraceFailed as e:
        if any(f"call_method {read}:" in str(e) for read in ("item", "tolist")):
            return NotLiftedMoba(
                f"forward reads tensor values on the host ({e}): MoBA code whose loops run over values (packed "
                f"sequences' cu_seqlens read with .item()) is not lifted, only code whose control flow follows "
                f"shapes; moec.ops.moba_attention(q, k, v, block_size=..., top_k=..., cu_seqlens=...) computes "
                f"MoBA over packed sequences")
        return NotLiftedMoba(f"forward could not be traced (fx, shape-specialised): {e}")
    try:
        m = match(tr)
    except NotMoba:
        return None
    except Reject as e:
        return NotLiftedMoba(str(e))
    N0, H, Hkv, D = _head_dims(m)
    B = int(val(m.q).shape[0])
    dims = input_seq_dims(bound, N0)
    if N0 < 2 or any(sum(t.shape[d] == N0 for d in range(t.dim() - 1)) > 1 for t in bound.tensors().values()):
        return NotLiftedMoba(f"this call cannot tell which input dim is the sequence (N={N0}); the next "
                             "call is analysed", final=False)
    if not dims:
        return NotLiftedMoba(f"no input dim holds the sequence length {N0}, so the probe cannot vary it")
    bs, cap = m.block_size, max(2, int(math.sqrt(PROBE_BUDGET / max(1, B * H))))
    gen = torch.Generator().manual_seed(0)
    top_k, k_read, seq_dims, probed, fps, other, offset = None, m.top_k_read, None, [], set(), [], None
    lengths = [_selection_length(module, bound, dims, m, cap, gen), N0,
               max(2, bs * max(k_read - 1, 1) - 3), 1]
    for N in dict.fromkeys(lengths):
        if N > cap:
            continue
        bN = random_bound(bound, dims, N, gen)
        try:
            trN = trace(module, bN)
            mN = match(trN, seq_dims)
        except NotMoba:
            other.append(N)           # another code path (e.g. dense attention for short inputs)
            continue
        except (TraceFailed, Reject) as e:
            return NotLiftedMoba(f"at sequence length {N}: {e}")
        if mN.block_size != bs:
            return NotLiftedMoba(f"the block size is not a constant: {bs} at N={N0}, {mN.block_size} at N={N}")
        if _head_dims(mN) != (N, H, Hkv, D) or (seq_dims is not None and mN.seq_dims != seq_dims):
            return NotLiftedMoba(f"the core's q/k/v shapes do not follow the sequence length (N={N})")
        seq_dims = mN.seq_dims
        cands = [top_k] if top_k is not None else [mN.top_k_read, mN.top_k_read + 1]
        got, why = probe_once(module, bN, trN, mN, cands)
        if got is None:
            return NotLiftedMoba(f"probe at N={N}: {why}")
        top_k = got
        if mN.top_k_read < mN.n_blocks:
            if offset is not None and offset != top_k - mN.top_k_read:
                return NotLiftedMoba(f"the topk count does not follow top_k={top_k} (N={N})")
            offset = top_k - mN.top_k_read
        probed.append(N)
        fps.add(mN.fingerprint())
    if top_k is None:
        return NotLiftedMoba(f"no probe length fits the probe budget (B={B}, H={H})")
    cfg = MobaConfig(bs, top_k, H, Hkv, D)
    dt = str(val(m.q).dtype).replace("torch.", "")
    notes = [f"boundaries at N={N0}: q {_desc(m.q)}, k {_desc(m.k)}, v {_desc(m.v)}; output {_desc(m.out)}",
             f"probe: the core matched moec's MoBA(block_size={bs}, top_k={top_k}) at N="
             f"{', '.join(map(str, probed))} ({dt}, random inputs)"]
    if other:
        notes.append(f"at N={', '.join(map(str, other))} forward takes a path without a MoBA core: such calls "
                     "run eagerly")
    return LiftedMoba(cfg, seq_dims, m.formulation, offset, fps, notes)


def _selection_length(module, bound: Bound, dims: dict, m: CoreMatch, cap: int, gen) -> int:
    """A sequence length (within the probe budget) where ``topk`` selects some, not all, of the blocks,
    so the probe sees the selection: grown from the example's top-k count until the trace shows it."""
    bs, k = m.block_size, m.top_k_read
    N = min(cap, bs * (k + 3) + bs // 2 + 1)
    for _ in range(4):
        try:
            mN = match(trace(module, random_bound(bound, dims, N, gen)), m.seq_dims)
        except (TraceFailed, NotMoba, Reject):
            return N
        if mN.top_k_read < mN.n_blocks or N >= cap:
            return N
        k = mN.top_k_read
        N = min(cap, bs * (2 * k + 3) + bs // 2 + 1)
    return N


def _desc(n: fx.Node) -> str:
    return f"{n.name} {list(val(n).shape)}"


# ----------------------------------------------------------------------------------------------
# one call signature

def specialise(module: nn.Module, bound: Bound, lifted: LiftedMoba) -> Union[tuple[Traced, CoreMatch], str]:
    """The traced graph and core of this call, confirmed; else the reason it runs eagerly."""
    try:
        tr = trace(module, bound)
        m = match(tr, lifted.seq_dims)
    except TraceFailed as e:
        return f"this call could not be traced: {e}"
    except (NotMoba, Reject) as e:
        return f"no liftable MoBA core in this call: {e}"
    cfg = lifted.config
    N, H, Hkv, D = _head_dims(m)          # heads and head_dim may differ per call (a core without weights)
    if m.block_size != cfg.block_size or m.seq_dims != lifted.seq_dims:
        return (f"this call's core differs from the lifted one (block size {m.block_size}, layouts "
                f"{m.seq_dims})")
    ts = [val(n) for n in (m.q, m.k, m.v)]
    if len({t.dtype for t in ts}) > 1:
        return "q, k and v of the core differ in dtype"
    dtype, device = ts[0].dtype, tr.device
    if dtype not in _KERNEL_DTYPES or device.type not in ("cpu", "cuda"):
        return f"the core runs in {dtype} on {device.type} (kernels take fp32/fp16/bf16 on cpu/cuda)"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 on CPU (the Triton interpreter computes bf16 dots wrongly)"
    want_k = cfg.top_k - (lifted.k_offset or 0)
    if m.top_k_read != min(want_k, m.n_blocks) and not (m.top_k_read >= m.n_blocks and want_k >= m.n_blocks):
        return (f"this call selects top-{m.top_k_read} of {m.n_blocks} blocks; the lifted core was confirmed "
                f"with top_k={cfg.top_k}")
    if lifted.k_offset is None and m.top_k_read < m.n_blocks:
        return "the probe only saw top-k select every block; this call selects some of them"
    fp = m.fingerprint()
    if fp not in lifted.fingerprints:
        real = random_bound(bound, {}, N, torch.Generator().manual_seed(1))
        got, why = probe_once(module, real, tr, m, [cfg.top_k])
        if got is None:
            return f"probe of this call's graph (an op sequence not seen before): {why}"
        lifted.fingerprints.add(fp)
    return tr, m


def rewrite(tr: Traced, m: CoreMatch, core: nn.Module) -> fx.GraphModule:
    """The traced forward with the core replaced by ``core(q, k, v)``; everything else unchanged."""
    g = tr.graph
    with g.inserting_before(m.out):
        new = g.call_module(CORE, (m.q, m.k, m.v))
    m.out.replace_all_uses_with(new)
    for n in reversed(list(g.nodes)):
        if n in m.nodes:
            g.erase_node(n)
    g.lint()
    targets = {n.target for n in g.nodes if n.op in ("get_attr", "call_module") and n.target != CORE}
    root = {t: resolve_attr(tr.root, t) for t in targets}
    root[CORE] = core
    return fx.GraphModule(root, g, class_name="MobaLiftedForward")


def eager_modules(gm: fx.GraphModule) -> list[str]:
    """The submodules the rewritten forward still calls (e.g. the projections)."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != CORE]


__all__ = ["LiftedMoba", "NotLiftedMoba", "analyse", "specialise", "rewrite", "find_moba_modules",
           "synthesize_args", "looks_like_moba", "to_bhnd", "eager_modules"]
