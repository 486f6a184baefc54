"""From a `MobaConfig` to a runnable `MobaProgram`: build IR, run the MoBA passes, lower, dump.

One compile serves every batch size and sequence length (``B`` and ``T`` stay symbolic until the
program runs). Compiled programs are memoised per (config, dtype, arch), so equal cores share kernels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moec.ir.text import print_graph
from moec.passes.lower_moba import MobaProgram, lower_moba
from moec.passes.moba_pipeline import run_moba_passes
from moec.passes.pipeline import PassContext
from moec.runtime.arch import Arch

from moec.ir.build import build_moba_graph

from .config import MobaConfig


@dataclass
class MobaCompiled:
    """One compiled MoBA core: the IR after each pass and the program."""

    config: MobaConfig
    dtype: torch.dtype
    arch: Arch
    stages: list[tuple[str, str]] = field(default_factory=list)   # (stage name, IR text)
    program: MobaProgram | None = None

    def kernel_steps(self) -> list:
        return [s for s in self.program.steps if s.variants]

    def tiles(self) -> dict:
        """Per kernel node: its op, kernel name and tile."""
        return {s.node.name: {"op": s.node.op, "kernel": s.variants[0].kernel.fn_name,
                              **s.variants[0].params.tile.as_dict()} for s in self.kernel_steps()}

    def describe_kernels(self) -> str:
        """``op [kernel: BMxBN wW sS]; ...`` for explain()."""
        def tile(t):
            d = t.as_dict()
            return "x".join(str(v) for k, v in d.items() if k.startswith("block")) + \
                f" w{d['num_warps']} s{d['num_stages']}"
        return "; ".join(f"{s.node.op} [{s.variants[0].kernel.fn_name}: {tile(s.variants[0].params.tile)}]"
                         for s in self.kernel_steps())

    def dump(self, directory: str | Path, captured: str = "") -> Path:
        """Write the captured region, the IR after each pass, the kernels and tiles under ``directory``."""
        from moec.compiler import dump_compiled
        return dump_compiled(self, directory, captured)


@functools.lru_cache(maxsize=128)
def compile_moba(cfg: MobaConfig, dtype: torch.dtype, arch: Arch) -> MobaCompiled:
    """Compile the MoBA core ``cfg`` for inputs of ``dtype`` on ``arch``."""
    graph = build_moba_graph(cfg, dtype)
    out = MobaCompiled(cfg, dtype, arch, [("captured", print_graph(graph))])
    final = run_moba_passes(graph, PassContext(arch), after=lambda name, g: out.stages.append((name, print_graph(g))))
    out.program = lower_moba(final, arch.name)
    return out
