"""A lowered program: the ordered kernel launches and device-side torch steps of one region.

`Program.run` binds the token count T from ``x``, allocates every result from its IR type
(sympy shapes evaluated at T: sizes depend on T only, never on routing data, so there is no host
synchronisation and CUDA graphs can capture a call), and runs the steps in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from moec.ir.graph import Graph, Node
from moec.ir.text import print_node

from .launch import Kernel


@dataclass(frozen=True)
class Step:
    node: Node
    run: Callable                 # (operands by role, results preallocated by role, ctx) -> None
    kernel: Optional[Kernel] = None
    params: object = None         # the kernel family's params dataclass (for dumps)

    @property
    def text(self) -> str:
        return print_node(self.node)


@dataclass
class Program:
    graph: Graph
    steps: list[Step]
    arch: str
    meta: dict = field(default_factory=dict)

    def kernels(self) -> list[tuple[Step, Kernel]]:
        return [(s, s.kernel) for s in self.steps if s.kernel is not None]

    def run(self, inputs: dict[str, torch.Tensor], *, training: bool = False,
            noise: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        x = inputs["x"]
        T = x.shape[0]
        values = dict(inputs)
        ctx = {"training": training, "noise": noise, "T": T}
        for step in self.steps:
            ins = {r: values[v] for r, v in step.node.operands}
            outs = {r: torch.empty(t.concrete(T=T), dtype=t.torch_dtype, device=x.device)
                    for (r, _), t in zip(step.node.results, step.node.types)}
            got = step.run(ins, outs, ctx)
            if got:                      # a step may return new tensors instead of filling outs
                outs.update(got)
            values.update({v: outs[r] for r, v in step.node.results})
        return [values[o] for o in self.graph.outputs]
