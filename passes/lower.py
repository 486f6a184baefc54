"""lower: the final graph becomes a `Program` of kernel launches and torch steps (the one non-IR -> IR
stage, the same for every region kind).

Expects: a verified graph after choose-tiles (kernel nodes carry tiles).
Guarantees: every kernel node (`moec.ir.ops.is_kernel`) is a generated Triton kernel per token-count
bucket of its ``tiles``, rendered here so dumps can show them before the first call (a call launches
the one whose bucket holds its T); the MoE nodes lower as `moec.passes.lower_moe` says, MoBA's as
`moec.passes.lower_moba` says, the backward's as `moec.passes.lower_grad` says. Any node no pass fused (e.g. a lone ``linear``), and ``select``, run
through the reference interpreter's torch code, so a graph is always runnable;
`Program.torch_steps` lists those for explain().
"""
from __future__ import annotations

from moec.ir.graph import Graph
from moec.runtime.program import Program

from .lower_grad import LOWERINGS as GRAD
from .lower_moba import LOWERINGS as MOBA
from .lower_moe import LOWERINGS as MOE
from .lower_steps import torch_step

LOWERINGS = {**MOE, **MOBA, **GRAD}


def lower(g: Graph, arch: str) -> Program:
    return Program(g, [LOWERINGS.get(n.op, torch_step)(n, g) for n in g.nodes], arch)
