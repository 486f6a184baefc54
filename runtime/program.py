"""A lowered program: the ordered kernel launches and device-side torch steps of one region.

`Program.run` binds the token count T from ``x``, allocates every result from its IR type
(sympy shapes evaluated at T: sizes depend on T only, never on routing data, so there is no host
synchronisation and CUDA graphs can capture a call), and runs the steps in order.

A kernel step has one `Variant` per token-count bucket of its node's ``tiles`` (each rendered
once, at lowering); a call launches the variant whose bucket holds the call's T, a host int, so
choosing costs no synchronisation either.

`Program.graph_safe` says whether a call can be captured in a CUDA graph: every step is a kernel
or a torch step written without host reads and data-dependent shapes (`GRAPH_SAFE_TORCH_OPS`);
any other torch step runs the reference interpreter's code (e.g. a router no pass fused), which
may synchronise. tests/test_graph_safety.py checks the claim op by op on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import sympy
import torch

from moec.ir.graph import Graph, Node
from moec.ir.types import T as SYM_T
from moec.ir.text import print_node

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

    @property
    def kernel(self) -> Optional[Kernel]:
        """The largest bucket's kernel (None for a torch step)."""
        return self.variants[-1].kernel if self.variants else None

    @property
    def params(self):
        return self.variants[-1].params if self.variants else None


# torch steps lowered without host synchronisation or data-dependent shapes: the dispatch sort
# (runtime/dispatch.py), the aux loss's element-wise ops (passes/lower.py), expert capacity
# (runtime/capacity.py)
GRAPH_SAFE_TORCH_OPS = frozenset({"dispatch", "aux_loss", "apply_capacity"})


def _shape_fn(t) -> Callable[[int], tuple]:
    """``T -> shape`` of an IR type, compiled once: evaluating the sympy dims at every call would
    cost ~100 us per result, more than a decode step's kernels."""
    if all(d.is_Integer for d in t.shape):
        const = tuple(int(d) for d in t.shape)
        return lambda T: const
    f = sympy.lambdify(SYM_T, sympy.Tuple(*t.shape), "math")
    return lambda T: tuple(int(v) for v in f(T))


@dataclass
class Program:
    graph: Graph
    steps: list[Step]
    arch: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # per step: (role, T -> shape, dtype) of each result, for allocation at call time
        self._allocs = [[(r, _shape_fn(t), t.torch_dtype) for (r, _), t in zip(s.node.results, s.node.types)]
                        for s in self.steps]

    @property
    def graph_safe(self) -> bool:
        """Whether a call can be captured in a CUDA graph (no host synchronisation, every buffer
        and grid sized from T alone)."""
        return not self.graph_unsafe_steps()

    def graph_unsafe_steps(self) -> list[str]:
        """Ops of the torch steps that may synchronise with the host (empty when `graph_safe`)."""
        return [s.node.op for s in self.steps if not s.variants and s.node.op not in GRAPH_SAFE_TORCH_OPS]

    def kernels(self) -> list[tuple[Step, Kernel]]:
        """Every rendered kernel (one per bucket variant) with its step."""
        return [(s, v.kernel) for s in self.steps for v in s.variants]

    def run(self, inputs: dict[str, torch.Tensor], *, training: bool = False,
            noise: Optional[torch.Tensor] = None, on_step: Optional[Callable] = None) -> list[torch.Tensor]:
        """Run every step; ``on_step(step, operands, results, ctx)`` is called after each (autotune
        uses it to capture a kernel's operands)."""
        x = inputs["x"]
        T = x.shape[0]
        values = dict(inputs)
        ctx = {"training": training, "noise": noise, "T": T}
        for step, allocs in zip(self.steps, self._allocs):
            ins = {r: values[v] for r, v in step.node.operands}
            if step.fills_results:
                outs = {r: torch.empty(shape(T), dtype=dtype, device=x.device) for r, shape, dtype in allocs}
            else:
                outs = {r: None for r, _, _ in allocs}
            got = step.execute(ins, outs, ctx)
            if got:                      # a step may return new tensors instead of filling outs
                outs.update(got)
            if on_step is not None:
                on_step(step, ins, outs, ctx)
            values.update({v: outs[r] for r, v in step.node.results})
        return [values[o] for o in self.graph.outputs]
