"""A lowered program: the ordered kernel launches and device-side torch steps of one compiled region
(an MoE layer, the routed experts of one, or a MoBA core: one `Program` for every kind).

`Program.run` binds the graph's size symbols from the inputs' shapes (``T`` tokens, ``B`` batch,
``S`` packed sequences: `moec.ir.types.binders`), allocates the results of the steps that write into
buffers from their IR types (sympy shapes evaluated at those sizes: sizes never depend on routing
data, so there is no host synchronisation and CUDA graphs can capture a call), and runs the steps in
order.

A kernel step has one `Variant` per token-count bucket of its node's ``tiles`` (each rendered
once, at lowering); a call launches the variant whose bucket holds the call's T, a host int, so
choosing costs no synchronisation either. A ``select`` node (alternative kernels for one result,
e.g. MoBA's two attention schemes) is decided from the sizes too, and only the steps the chosen
branches need run.

`Program.graph_safe` says whether a call can be captured in a CUDA graph: every step is a kernel
or a torch step written without host reads and data-dependent shapes (`GRAPH_SAFE_TORCH_OPS`);
any other torch step runs the reference interpreter's code (e.g. a router no pass fused), which
may synchronise. tests/test_graph_safety.py checks the claim op by op on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy
import torch

from moec.ir.graph import Graph, Node
from moec.ir.text import print_node
from moec.ir.types import bind_sizes, binders, condition

from .launch import Kernel


@dataclass(frozen=True)
class Variant:
    """One rendered kernel of a kernel step: the one launched when ``T <= bound``."""

    bound: Optional[int]          # inclusive upper bound of its bucket; None: every larger T
    params: object                # the kernel family's params dataclass (its tile and bucket)
    kernel: Kernel


@dataclass(frozen=True)
class Step:
    node: Node
    run: Optional[Callable] = None     # torch steps: (operands, preallocated results, ctx) -> dict | None
    variants: tuple = ()               # kernel steps: one Variant per bucket, ascending, None last
    launch: Optional[Callable] = None  # kernel steps: (params, operands, results, ctx) -> dict | None
    fills_results: bool = False        # it writes into preallocated results (else it returns its own)
    # kernel steps: (params, {role: bound input}) -> its launch plan, ``(env, ctx) -> None`` reading its
    # operands from and writing its results into the values ``env`` (by name), or None when the plan
    # needs an operand that is not bound (then `execute` runs it)
    prepare: Optional[Callable] = None
    helpers: tuple = ()                # kernels it launches besides its variants (the tile schedule's), for dumps

    @property
    def text(self) -> str:
        return print_node(self.node)

    def variant(self, T: int) -> Variant:
        """The variant whose bucket holds ``T`` (the first, in ascending order, with ``T <= bound``)."""
        for v in self.variants:
            if v.bound is None or T <= v.bound:
                return v
        raise ValueError(f"{self.node.name}: no bucket holds T={T} (bounds {[v.bound for v in self.variants]})")

    def execute(self, operands: dict, results: dict, ctx: dict):
        if self.variants:
            return self.launch(self.variant(ctx["T"]).params, operands, results, ctx)
        return self.run(operands, results, ctx)

    def plan(self, T: int, bound: dict) -> Callable:
        """``(env, ctx) -> None``: this step at token count ``T`` on the values ``env`` (by name), its
        prepared launch plan where it has one for the inputs ``bound`` ({value name: tensor})."""
        if self.variants and self.prepare is not None:
            got = self.prepare(self.variant(T).params,
                               {r: bound[v] for r, v in self.node.operands if v in bound})
            if got is not None:
                return got
        node = self.node

        def go(env: dict, ctx: dict) -> None:
            outs = {r: env.get(v) for r, v in node.results}
            got = self.execute({r: env[v] for r, v in node.operands}, outs, ctx)
            if got:
                outs.update(got)
            env.update({v: outs[r] for r, v in node.results})
        return go

    @property
    def kernel(self) -> Optional[Kernel]:
        """The largest bucket's kernel (None for a torch step)."""
        return self.variants[-1].kernel if self.variants else None

    @property
    def params(self):
        return self.variants[-1].params if self.variants else None


# torch steps lowered without host synchronisation or data-dependent shapes: the dispatch sort
# (runtime/dispatch.py), the aux loss's element-wise ops, expert capacity (runtime/capacity.py),
# the shape-decided `select`, and the backward's router, shared-gate and routing-weight gradients
# (written-out formulas: moec.reference.route_backward), its fp32 adds and MoBA's row term, and identity
# experts' element-wise forward and backward
GRAPH_SAFE_TORCH_OPS = frozenset({"dispatch", "aux_loss", "apply_capacity", "select", "router_grad", "route_grad",
                                  "shared_gate_grad", "pair_weight_grad", "add", "attention_delta",
                                  "identity_experts", "identity_experts_grad"})
# torch steps that are bookkeeping, not computation a kernel could have done (explain() lists the rest)
_BOOKKEEPING_OPS = frozenset({"dispatch", "aux_loss", "select"})


def _shape_fn(t) -> Callable[[dict], tuple]:
    """``sizes -> shape`` of an IR type, compiled once: evaluating the sympy dims at every call would
    cost ~100 us per result, more than a decode step's kernels."""
    if all(d.is_Integer for d in t.shape):
        const = tuple(int(d) for d in t.shape)
        return lambda sizes: const
    syms = sorted(set().union(*(d.free_symbols for d in t.shape)), key=str)
    f = sympy.lambdify(syms, sympy.Tuple(*t.shape), "math")
    return lambda sizes: tuple(int(v) for v in f(*(sizes[s] for s in syms)))


def _given(t: torch.Tensor, shape: tuple, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A caller's tensor for a result (`Program.run`'s ``into``), checked against the result's type."""
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"into[{name!r}] must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
    return t


def _predicate(when: str) -> Callable[[dict], bool]:
    cond = condition(when)
    syms = sorted(cond.free_symbols, key=str)
    f = sympy.lambdify(syms, cond, "math")
    return lambda sizes: bool(f(*(sizes[s] for s in syms)))


@dataclass
class Program:
    graph: Graph
    steps: list[Step]
    arch: str

    def __post_init__(self) -> None:
        self._binders = binders(self.graph.inputs)
        self._token_dim = next(((n, i) for n, i, s, _ in self._binders if str(s) == "T"), None)
        # per step: (role, sizes -> shape, dtype) of each result, for allocation at call time
        self._allocs = [[(r, _shape_fn(t), t.torch_dtype) for (r, _), t in zip(s.node.results, s.node.types)]
                        if s.fills_results else [] for s in self.steps]
        self._selects = [(i, _predicate(s.node.attr["when"])) for i, s in enumerate(self.steps)
                         if s.node.op == "select"]
        self._schedules: dict = {}
        # inputs whose types do not depend on the call's sizes (weights): what `bind` may hold
        self.static_inputs = frozenset(n for n, t in self.graph.inputs if all(d.is_Integer for d in t.shape))
        self._unbound = Bound(self, {})

    @property
    def graph_safe(self) -> bool:
        """Whether a call can be captured in a CUDA graph (no host synchronisation, every buffer
        and grid sized from the inputs' shapes alone)."""
        return not self.graph_unsafe_steps()

    def graph_unsafe_steps(self) -> list[str]:
        """Ops of the torch steps that may synchronise with the host (empty when `graph_safe`)."""
        return [s.node.op for s in self.steps if not s.variants and s.node.op not in GRAPH_SAFE_TORCH_OPS]

    def torch_steps(self) -> list[str]:
        """Ops that run as torch code rather than generated kernels (bookkeeping steps aside)."""
        return [s.node.op for s in self.steps if not s.variants and s.node.op not in _BOOKKEEPING_OPS]

    def kernels(self) -> list[tuple[Step, Kernel]]:
        """Every rendered kernel (one per bucket variant, and the helpers a step launches) with its step."""
        return [(s, k) for s in self.steps for k in (*(v.kernel for v in s.variants), *s.helpers)]

    def sizes(self, inputs: dict) -> dict:
        """The graph's symbols bound from ``inputs``' shapes (``{T: 7, ...}``)."""
        return bind_sizes(self._binders, inputs)

    def _schedule(self, taken: tuple, needed: tuple = ()) -> list[int]:
        """The steps a call runs when the selects take ``taken`` (True: operand ``a``): those the
        outputs (or the values ``needed``) need, through the chosen operand of each select."""
        key = (taken, needed)
        got = self._schedules.get(key)
        if got is None:
            producer = {v: i for i, s in enumerate(self.steps) for v in s.node.outs.values()}
            choice = {i: ("a" if t else "b") for (i, _), t in zip(self._selects, taken)}
            live, todo = set(), [producer[o] for o in (needed or self.graph.outputs) if o in producer]
            while todo:
                i = todo.pop()
                if i in live:
                    continue
                live.add(i)
                node = self.steps[i].node
                reads = [node.ins[choice[i]]] if i in choice else node.ins.values()
                todo += [producer[v] for v in reads if v in producer]
            got = self._schedules[key] = sorted(live)
        return got

    def run(self, inputs: dict[str, torch.Tensor], *, training: bool = False, noise: Optional[torch.Tensor] = None,
            on_step: Optional[Callable] = None, values: bool = False, needed: tuple = (), into: Optional[dict] = None,
            group_size: Optional[int] = None):
        """Run the steps; returns the graph's outputs in order (``values=True``: every value, by name,
        e.g. for a backward that reuses an intermediate; ``group_size``: tokens per sequence, for a
        per-sequence expert capacity). ``needed``: run only the steps these values
        need (e.g. the routing alone), and return every value. ``into``: ``{value: tensor}`` the caller
        provides for results (any strides, e.g. views of a parameter's gradient layout): kernels write
        there, a torch step's result is copied there. ``on_step(step, operands, results, ctx)`` is called
        after each (autotune uses it to capture a kernel's operands)."""
        return self._unbound.run(inputs, training=training, noise=noise, on_step=on_step, values=values,
                                 needed=needed, into=into, group_size=group_size)

    def bind(self, inputs: dict[str, torch.Tensor]) -> "Bound":
        """The program with its weights bound: ``inputs``' tensors of `static_inputs` (the others are
        ignored). Their shapes, strides, dtypes and devices are checked and the kernels' launch
        arguments laid out once (`Step.prepare`), so a call (`Bound.run`) passes only the per-call
        inputs. The caller makes a new binding when a bound tensor is replaced or changes shape,
        strides, dtype or device; writes into its memory need none (kernels read it at each call)."""
        return Bound(self, {n: t for n, t in inputs.items() if n in self.static_inputs})


class Bound:
    """A `Program` with some inputs bound (`Program.bind`): per token count, each step's launch plan is
    made once and kept, so a call at a T seen before allocates the results and launches, nothing else."""

    MAX_PLANS = 64          # token counts whose plans are kept (decode: a handful)

    def __init__(self, program: Program, bound: dict):
        self.program, self.bound = program, bound
        self._plans: dict = {}          # the sizes' values -> [(results to allocate, the step's plan)]

    def _plan(self, sizes: dict, T: int) -> list:
        p = self.program
        got = [(tuple((s.node.outs[r], shape(sizes), dtype) for r, shape, dtype in p._allocs[i]), s.plan(T, self.bound))
               for i, s in enumerate(p.steps)]
        if len(self._plans) < self.MAX_PLANS:
            self._plans[tuple(sizes.values())] = got
        return got

    def run(self, inputs: dict[str, torch.Tensor], *, training: bool = False, noise: Optional[torch.Tensor] = None,
            on_step: Optional[Callable] = None, values: bool = False, needed: tuple = (), into: Optional[dict] = None,
            group_size: Optional[int] = None):
        """`Program.run`, with the bound inputs added to ``inputs``."""
        p = self.program
        env = {**self.bound, **inputs} if self.bound else dict(inputs)
        sizes = bind_sizes(p._binders, env)
        lead = env[p._token_dim[0]] if p._token_dim else next(iter(env.values()))
        T = lead.shape[p._token_dim[1]] if p._token_dim else 0
        device = lead.device
        ctx = {"training": training, "noise": noise, "T": T, "sizes": sizes, "group_size": group_size}
        if not (p._selects or needed or into or on_step):      # every step, as planned for these sizes
            for allocs, go in self._plans.get(tuple(sizes.values())) or self._plan(sizes, T):
                for name, shape, dtype in allocs:
                    env[name] = torch.empty(shape, dtype=dtype, device=device)
                go(env, ctx)
            return env if values else [env[o] for o in p.graph.outputs]
        order = range(len(p.steps))
        if p._selects or needed:
            taken = tuple(pred(sizes) for _, pred in p._selects)
            ctx["taken"] = dict(zip((i for i, _ in p._selects), taken))
            order = p._schedule(taken, tuple(needed))
        for i in order:
            step = p.steps[i]
            if step.node.op == "select":
                env[step.node.outs["out"]] = env[step.node.ins["a" if ctx["taken"][i] else "b"]]
                continue
            ins = {r: env[v] for r, v in step.node.operands}
            given = {r: into[v] for r, v in step.node.results if v in into} if into else {}
            if step.fills_results:
                outs = {r: _given(given[r], shape(sizes), dtype, step.node.outs[r]) if r in given
                        else torch.empty(shape(sizes), dtype=dtype, device=device) for r, shape, dtype in p._allocs[i]}
            else:
                outs = {r: None for r, _ in step.node.results}
            got = step.execute(ins, outs, ctx)
            if got:                      # a step may return new tensors instead of filling outs
                outs.update(got)
            for r, t in given.items():
                if outs[r] is not t:
                    outs[r] = t.copy_(outs[r])
            if on_step is not None:
                on_step(step, ins, outs, ctx)
            env.update({v: outs[r] for r, v in step.node.results})
        return env if (values or needed) else [env[o] for o in p.graph.outputs]
