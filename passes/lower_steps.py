"""The step builders every lowering shares: a kernel step (one rendered kernel per token-count bucket
of its node's tiles), a torch step (the reference interpreter's code, so any graph is runnable), and
the kernel header's node line."""
from __future__ import annotations

from moec.ir.graph import Node
from moec.ir.interp import run_node
from moec.ir.ops import PROVENANCE_ATTRS
from moec.ir.text import print_node
from moec.ir.tiles import bucket_ranges
from moec.runtime.program import Step, Variant


def header(n: Node) -> str:
    """The node's text line for its kernels' headers: everything that shapes the kernel, so not where
    its tiles came from (that does not change the code, and the kernel cache is shared)."""
    return print_node(n.replace(attrs=dict.fromkeys(PROVENANCE_ATTRS)))


def kernel_step(n: Node, params_for, render, launch, fills_results: bool = True, prepare=None) -> Step:
    """A kernel step with one variant per bucket of the node's ``tiles`` (each rendered here, so dumps
    show kernels before the first call). ``params_for(tile, bucket)`` makes the kernel's params,
    ``render(params)`` its kernel, ``launch(params, operands, results, ctx)`` runs it; ``prepare``: its
    launch plan for bound weights (`moec.runtime.program.Step.prepare`)."""
    tiles = n.attr.get("tiles")
    if not tiles:
        raise ValueError(f"{n.op} %{n.name} has no tiles: run choose-tiles before lowering")
    bounds = list(tiles)
    variants = []
    for bound, (lo, hi) in zip(bounds, bucket_ranges(bounds)):
        params = params_for(tiles[bound], () if len(bounds) == 1 else (lo, hi))
        variants.append(Variant(bound, params, render(params)))
    return Step(n, variants=tuple(variants), launch=launch, fills_results=fills_results, prepare=prepare)


def torch_step(n: Node, g=None) -> Step:
    """The node run by the reference interpreter's torch code (an op no pass fused, a ``select``)."""
    def run(v, outs, ctx):
        by_name = {name: v[role] for role, name in n.operands}
        got = run_node(n, by_name, ctx)
        return {role: got[name] for role, name in n.results}
    return Step(n, run)
