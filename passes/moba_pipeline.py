"""The MoBA pass pipeline, in the order it runs (the MoE pipeline is `moec.passes.pipeline`).

A lifted MoBA core (`moec.moba.build.build_moba_graph`) goes through

    verify -> infer-shapes -> fuse-block-gate -> choose-moba-tiles

with the same driver as the MoE pipeline (`run_passes`: verified between passes,
``MOEC_PRINT_AFTER``, `PassError` naming the failing pass), then `moec.passes.lower_moba.lower_moba`
turns the final graph into a runnable program: two generated kernels (the fused gate and the
block-sparse attention) and the key pooling as a torch step.
"""
from __future__ import annotations

from moec.ir.graph import Graph

from .choose_moba_tiles import choose_moba_tiles
from .fuse_block_gate import fuse_block_gate
from .infer_shapes import infer_shapes
from .pipeline import Pass, PassContext, _verify, run_passes

MOBA_PIPELINE: tuple[Pass, ...] = (
    Pass("verify", _verify),
    Pass("infer-shapes", infer_shapes),
    Pass("fuse-block-gate", fuse_block_gate),
    Pass("choose-moba-tiles", choose_moba_tiles),
)


def run_moba_passes(g: Graph, ctx: PassContext, after=None) -> Graph:
    """Run `MOBA_PIPELINE` on ``g``; ``after(pass_name, graph)`` is called after each (for dumps)."""
    return run_passes(g, ctx, passes=MOBA_PIPELINE, after=after)
