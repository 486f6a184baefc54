"""The pass pipelines, in the order they run. Read this file top to bottom to know what moec does.

One pipeline per region kind (`PIPELINES`): an MoE layer (or the routed experts alone) and a MoBA
core share the driver (`run_passes`), the verifier between passes, choose-tiles and the lowering.
Each pass is a pure function ``(Graph, PassContext) -> Graph`` with its contract in its module
docstring; what a pass needs from outside (the target arch, the tune file's entries) comes in the
`PassContext`. Between passes the graph is verified; ``MOEC_PRINT_AFTER=<pass>[,<pass>]`` (or
``all``) prints the IR after those passes; a failing pass raises `PassError` naming it and the
passes that ran before it. `moec.passes.lower.lower` then turns the final graph into a runnable
`moec.runtime.program.Program`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from moec import env
from moec.ir.graph import Graph
from moec.ir.text import print_graph
from moec.ir.verify import verify
from moec.runtime.arch import Arch
from moec.runtime.tune_file import Lookup

from .canonicalize_router import canonicalize_router
from .choose_moba_scheme import choose_moba_scheme
from .choose_tiles import choose_tiles
from .fold_combine import fold_combine
from .fold_permute import fold_permute
from .fuse_activation import fuse_activation
from .fuse_block_gate import fuse_block_gate
from .fuse_dispatch import fuse_dispatch
from .fuse_routing import fuse_routing
from .infer_shapes import infer_shapes
from .save_activations import save_activations
from .schedule_tiles import schedule_tiles


@dataclass(frozen=True)
class PassContext:
    """What passes may know beyond the graph: the target, the tune file's entries for it, and for a
    forward whose backward will run, what to keep for it."""

    arch: Arch
    tuned: Optional[Lookup] = None
    saving: str = ""            # a forward a backward follows: its activations policy (save-activations)


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[Graph, PassContext], Graph]


def _verify(g: Graph, ctx: PassContext) -> Graph:
    """verify: the input graph is well formed (see moec.ir.verify); returns it unchanged."""
    return verify(g)


# An MoE layer (`moec.ir.build.build_moe_graph`) or its routed experts (`build_experts_graph`).
PIPELINE: tuple[Pass, ...] = (
    Pass("verify", _verify),
    Pass("infer-shapes", infer_shapes),
    Pass("canonicalize-router", canonicalize_router),
    Pass("fuse-routing", fuse_routing),
    Pass("fuse-dispatch", fuse_dispatch),
    Pass("fold-permute", fold_permute),
    Pass("fuse-activation", fuse_activation),
    Pass("fold-combine", fold_combine),
    Pass("save-activations", save_activations),
    Pass("choose-tiles", choose_tiles),
    Pass("schedule-tiles", schedule_tiles),
)

# A MoBA core (`moec.ir.build.build_moba_graph`).
MOBA_PIPELINE: tuple[Pass, ...] = (
    Pass("verify", _verify),
    Pass("infer-shapes", infer_shapes),
    Pass("fuse-block-gate", fuse_block_gate),
    Pass("choose-moba-scheme", choose_moba_scheme),
    Pass("choose-tiles", choose_tiles),
)

# The backward of an MoE layer, of its routed experts or of a MoBA core (`moec.ir.backward`): built fused
# (each forward fragment's vector-Jacobian fragment is already the kernels' shape), so only tiles remain.
BACKWARD_PIPELINE: tuple[Pass, ...] = (
    Pass("verify", _verify),
    Pass("infer-shapes", infer_shapes),
    Pass("choose-tiles", choose_tiles),
)

PIPELINES = {"moe": PIPELINE, "moba": MOBA_PIPELINE, "moe_backward": BACKWARD_PIPELINE,
             "moba_backward": BACKWARD_PIPELINE}


class PassError(RuntimeError):
    pass


def run_passes(g: Graph, ctx: PassContext, passes=PIPELINE, after: Callable | None = None) -> Graph:
    """Run ``passes`` in order; ``after(pass_name, graph)`` is called after each (for dumps)."""
    wanted = env.names("MOEC_PRINT_AFTER", dict.fromkeys(p.name for ps in PIPELINES.values() for p in ps), ("all",))
    done: list[str] = []
    for p in passes:
        try:
            g = verify(p.fn(g, ctx))
        except Exception as e:
            raise PassError(f"pass {p.name!r} failed (after {done or 'nothing'}): "
                            f"{type(e).__name__}: {e}") from e
        done.append(p.name)
        if after is not None:
            after(p.name, g)
        if p.name in wanted or "all" in wanted:
            print(f"// ----- IR after {p.name}\n{print_graph(g)}", file=sys.stderr)
    return g
