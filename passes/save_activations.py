"""save-activations: in a forward whose backward will run, decide whether that backward reads the
activation's inputs (the gate/up products) saved by the forward, or recomputes them from ``x``.

Expects: ``ctx.saving``: ``""`` for a forward no backward follows (then the pass does nothing),
``"save"``, ``"recompute"`` or ``"auto"``; fused gate/up GEMMs (``grouped_gemm`` with an activation,
from fuse-activation or built fused, as the shared expert's) not already storing them.
Guarantees: when saving is chosen, each such node also returns ``pre`` (and ``pre_up`` with a GLU):
the products before the activation, biases added, in the layer's dtype, stored from the same fp32
accumulators at the same rows as the node's output (`moec.ir.backward.saved_values` names them for the
backward, which then reads them instead of running two grouped GEMMs again); GEMMs whose rows the routing
weights scale (``scale_in``, or reading a scaled ``permute``) are always recomputed. Otherwise the graph is
unchanged. The numbers are the same either way: both paths round the same fp32 products once.

The choice (`decide`): ``"auto"`` saves when writing and reading the saved rows costs less time on the
target than recomputing them (their FLOPs at the arch's tensor-core rate against their bytes at its
memory bandwidth), which holds for any hidden size a real model has. Memory: either way the layer keeps
less than eager autograd does — saving keeps ``k x (2 f)`` values per token (GLU; ``k x f`` without),
eager keeps at least the gathered input rows, both products, the activation and ``h``
(``k x (d + 4 f)``) — so activation memory never exceeds eager's; ``"recompute"`` keeps only the routing.
"""
from __future__ import annotations

from dataclasses import dataclass

from moec.ir.graph import Graph
from moec.ir.types import TensorType
from moec.runtime.arch import Arch

from .rewrite import swap

POLICIES = ("auto", "save", "recompute")
# FLOPs per DRAM byte where an arch gives no rates (the CPU interpreter): about an A100's balance
_DEFAULT_BALANCE = 150.0


@dataclass(frozen=True)
class Choice:
    """What `decide` chose for one layer and why (figures per token, in bytes and FLOPs)."""

    save: bool
    saved_bytes: int          # per token, when saving
    eager_bytes: int          # per token, the least eager autograd keeps for the same computation
    recompute_flops: int      # per token, the two (one without a GLU) grouped GEMMs recomputing them
    policy: str

    def text(self) -> str:
        """One line for ``explain()``."""
        what = ("gate/up pre-activations saved by the forward" if self.save
                else "gate/up projections recomputed from x in the backward")
        cost = (f"saving keeps {_kib(self.saved_bytes)} per token (eager autograd keeps at least "
                f"{_kib(self.eager_bytes)}); recomputing costs {_flop(self.recompute_flops)} per token")
        return f"{what} (activations={self.policy!r}: {cost})"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _flop(n: int) -> str:
    return f"{n / 1e6:.1f} MFLOP" if n >= 1e6 else f"{n / 1e3:.1f} kFLOP"


def decide(rows_per_token: list[int], d: int, widths: list[int], glu: bool, itemsize: int, arch: Arch,
           policy: str) -> Choice:
    """Save or recompute the pre-activations of gate/up GEMMs reading ``rows_per_token`` rows of width ``d``
    per token (top-k for routed experts, 1 for a shared one; ``widths``: each GEMM's f)."""
    if policy not in POLICIES:
        raise ValueError(f"activations must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    products = 2 if glu else 1
    saved = sum(r * products * f * itemsize for r, f in zip(rows_per_token, widths))
    eager = sum(r * (d + (4 if glu else 2) * f) * itemsize for r, f in zip(rows_per_token, widths))
    flops = sum(r * products * 2 * d * f for r, f in zip(rows_per_token, widths))
    if policy == "auto":
        balance = (arch.bf16_tflops * 1e12 / (arch.dram_gbps * 1e9)
                   if arch.bf16_tflops and arch.dram_gbps else _DEFAULT_BALANCE)
        save = 2 * saved * balance < flops      # written once, read once, vs recomputed at the tensor-core rate
    else:
        save = policy == "save"
    return Choice(save and saved <= eager, saved, eager, flops, policy)


def gate_up_nodes(g: Graph) -> list:
    """The fused gate/up GEMMs of a forward graph (an activation in their epilogue)."""
    return [n for n in g.nodes if n.op == "grouped_gemm" and n.attr["activation"] is not None]


def choice_for(g: Graph, arch: Arch, policy: str) -> Choice:
    """`decide` for the gate/up GEMMs of ``g``."""
    nodes = gate_up_nodes(g)
    a = [g.types[n.ins["a"]] for n in nodes]
    return decide([n.attr["gather_top_k"] or 1 for n in nodes], int(a[0].shape[1]) if a else 0,
                  [int(n.types[0].shape[1]) for n in nodes], any(n.attr["glu"] for n in nodes),
                  a[0].torch_dtype.itemsize if a else 2, arch, policy)


def save_activations(g: Graph, ctx) -> Graph:
    # rows the routing weights scale (scale_in, or a scaled permute's rows) are recomputed: their backward reads
    # the unscaled products
    scaled = {n.outs["out"] for n in g.nodes if n.op == "permute" and "scale" in n.ins}
    nodes = [n for n in gate_up_nodes(g) if "pre" not in n.outs and not n.attr["scatter"] and not n.attr["scale_in"]
             and n.ins["a"] not in scaled]
    if not ctx.saving or not nodes or not choice_for(g, ctx.arch, ctx.saving).save:
        return g
    repl = {}
    for n in nodes:
        extra = ["pre", "pre_up"] if n.attr["glu"] else ["pre"]
        t = n.types[0]
        pre_t = TensorType(g.types[n.ins["a"]].dtype, t.shape)
        names = tuple((r, f"{n.outs['out']}_{r}") for r in extra)
        repl[g.nodes.index(n)] = [n.replace(results=n.results + names, types=n.types + (pre_t,) * len(extra))]
    return swap(g, repl)
