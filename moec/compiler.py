"""From an `MoESpec` to a runnable `Program`: build IR, run the pass pipeline, lower, dump.

One compile serves every token count: T stays symbolic until `Program.run` binds it. Compiled
programs are memoised per (spec, dtype, outputs, arch), so equal layers share their kernels;
writing the tune file (`moec.runtime.autotune.invalidate`) clears the memo, and compiled modules
recompile at their next call (`moec.region.Region.compiled_for`).
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moec.ir.build import build_moe_graph
from moec.ir.graph import Graph
from moec.ir.text import print_graph
from moec.passes.lower import lower
from moec.passes.pipeline import PassContext, run_passes
from moec.runtime.arch import Arch
from moec.runtime.program import Program

from .spec import MoESpec


@dataclass
class Compiled:
    """The result of compiling one region: the IR after each pass and the program."""

    spec: MoESpec
    dtype: torch.dtype
    arch: Arch
    stages: list[tuple[str, str]] = field(default_factory=list)   # (stage name, IR text)
    program: Program | None = None
    # where each kernel node's tiles came from (`passes.choose_tiles.tile_sources`):
    # {node name: {bucket bound: "tune file" | "cost model" | "interpreter table"}}
    sources: dict = field(default_factory=dict)
    tune_notes: list = field(default_factory=list)     # tune entries that apply here but were ignored, why
    tuned_from: str = ""                               # "<device> in <file>" when a tune file applied

    @property
    def graph(self) -> Graph:
        return self.program.graph

    def tiles(self) -> dict:
        """Per kernel node: its op and, per token-count bucket, the kernel, its tile and where the
        tile came from (``source``: see `variant_source`)."""
        from moec.ir.tiles import bucket_text
        return {s.node.name: {"op": s.node.op,
                              "buckets": {(bucket_text(*v.params.bucket) if v.params.bucket else "every T"):
                                          {"kernel": v.kernel.fn_name, **v.params.tile.as_dict(),
                                           "source": self.variant_source(s, v)}
                                          for v in s.variants}}
                for s in self.program.steps if s.variants}

    def variant_source(self, step, variant) -> str:
        """Where a kernel variant's tile came from: "tune file", "cost model", "interpreter table",
        or e.g. "tune file + cost model" when its folded buckets differ."""
        from moec.ir.tiles import BUCKETS, bucket_ranges
        per_bucket = self.sources.get(step.node.name, {})
        got = [per_bucket.get(b, "cost model") for (lo, _), b in zip(bucket_ranges(BUCKETS), BUCKETS)
               if step.variant(lo) is variant]
        return " + ".join(dict.fromkeys(got)) or "cost model"

    def dump(self, directory: str | Path, captured: str = "") -> Path:
        """Write the captured region, IR after each pass, kernels and tiles under ``directory``."""
        return dump_compiled(self, directory, captured)


def dump_compiled(c, directory: str | Path, captured: str = "") -> Path:
    """Write a compiled region for inspection under ``directory``: ``captured.txt`` (what the frontend
    read), ``ir.NN.<stage>.txt`` (the IR after each pass), ``kernels/`` (every generated kernel) and
    ``tiles.json``. ``c`` has ``stages``, ``program.kernels()`` and ``tiles()``."""
    d = Path(directory)
    (d / "kernels").mkdir(parents=True, exist_ok=True)
    if captured:
        (d / "captured.txt").write_text(captured)
    for i, (name, text) in enumerate(c.stages):
        (d / f"ir.{i:02d}.{name}.txt").write_text(text)
    for step, kernel in c.program.kernels():
        (d / "kernels" / f"{step.node.name}.{kernel.fn_name}.py").write_text(kernel.source)
    (d / "tiles.json").write_text(json.dumps(c.tiles(), indent=2) + "\n")
    return d


@functools.lru_cache(maxsize=256)
def compile_spec(spec: MoESpec, dtype: torch.dtype, outputs: tuple[str, ...], arch: Arch) -> Compiled:
    """Compile ``spec`` for inputs of ``dtype`` on ``arch``; ``outputs`` from y/logits/aux."""
    graph = build_moe_graph(spec, dtype, outputs)
    out = Compiled(spec, dtype, arch, [("captured", print_graph(graph))])
    final = run_passes(graph, PassContext(arch), after=lambda name, g: out.stages.append((name, print_graph(g))))
    out.program = lower(final, arch.name)
    _record_sources(out, final, arch)
    return out


def _record_sources(out: Compiled, g: Graph, arch: Arch) -> None:
    """Fill ``out``'s tile provenance: which buckets the tune file decided, and the entries it has
    for this device that were ignored (the compile also warned about those)."""
    from moec.passes.choose_tiles import tile_sources
    from moec.passes.cost_model import PROBLEMS
    from moec.runtime import autotune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", autotune.TuneWarning)      # choose-tiles warned already
        tuned = autotune.lookup_for(arch)
    out.tuned_from = f"{tuned.device} in {tuned.path}" if tuned is not None else ""
    for n in g.nodes:
        if n.op in PROBLEMS:
            out.sources[n.name], notes = tile_sources(n, g, arch, tuned)
            out.tune_notes += notes
