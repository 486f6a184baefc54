"""The compile driver: the one place where an IR graph becomes kernels, for every kind of region.

    recipe (what to compile)  ->  IR graph (`moec.ir.build`)  ->  its kind's pass pipeline
    (`moec.passes.pipeline.PIPELINES`)  ->  `moec.passes.lower.lower`  ->  `Program`

A recipe names what is compiled, independent of dtype and target: `MoERecipe` (an MoE layer from
its `MoESpec`: lifted modules, `moec.ops.moe`), `ExpertsRecipe` (the routed experts alone, given the
routing: transformers' ``experts_implementation="moec"``), `MobaRecipe` (a MoBA core: lifted
attention, `moec.ops.moba_attention`), `BackwardRecipe` (the backward of an MoE or experts recipe). One compile serves every token count: the sizes stay symbolic
until `Program.run` binds them. The tune file's entries for the target are read here and handed to
choose-tiles through the `PassContext`.

Compiled programs are memoised per (recipe, dtype, arch) and the tune file's generation
(`moec.runtime.tune_file.generation`): after the tune file changes (`invalidate`, which `moec.tune`
calls) every compile reads it again, and compiled modules pick the new program up at their next call
(`moec.region.Region.compiled_for`).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moec.ir.backward import build_experts_backward_graph, build_moba_backward_graph, build_moe_backward_graph
from moec.ir.build import build_experts_graph, build_moba_graph, build_moe_graph
from moec.ir.graph import Graph
from moec.ir.text import print_graph
from moec.ir.tiles import BUCKETS, bucket_key, bucket_ranges, bucket_text
from moec.passes.lower import lower
from moec.passes.pipeline import PIPELINES, PassContext, run_passes
from moec.runtime import tune_file
from moec.runtime.arch import Arch
from moec.runtime.program import Program

from .log import logger
from .moba.config import MobaConfig
from .spec import MoESpec


_log, _tiles_log = logger("compile"), logger("tiles")


# ---- recipes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoERecipe:
    """An MoE layer: ``outputs`` from y / logits / aux / weights (`moec.ir.build.build_moe_graph`)."""

    spec: MoESpec
    outputs: tuple = ("y",)
    saving: str = ""                # a forward a backward follows: the activations policy (save-activations)
    kind = "moe"

    def build(self, dtype: torch.dtype) -> Graph:
        return build_moe_graph(self.spec, dtype, self.outputs)

    def summary(self) -> str:
        s, r = self.spec, self.spec.router
        identity = f" + {s.identity_experts} identity" if s.identity_experts else ""
        return f"MoE layer ({s.ffn_experts} experts{identity}, top-{r.top_k}, d={s.hidden}, f={s.ffn})"


@dataclass(frozen=True)
class ExpertsRecipe:
    """The routed experts of an MoE layer given the routing (ids and weights are inputs):
    ``E`` experts, top-``k``, hidden ``d``, width ``f``; ``variant`` the GLU variant's non-default
    items ``((name, value), ...)``."""

    E: int
    k: int
    d: int
    f: int
    activation: str
    glu: bool
    bias: bool = False
    variant: tuple = ()
    saving: str = ""
    kind = "moe"

    def build(self, dtype: torch.dtype) -> Graph:
        return build_experts_graph(self.E, self.k, self.d, self.f, self.activation, self.glu, dtype, self.bias,
                                   self.variant)

    @property
    def name(self) -> str:
        extra = "".join(f".{n}{v:g}" for n, v in self.variant) + (".bias" if self.bias else "")
        return f"E{self.E}.k{self.k}.d{self.d}.f{self.f}.{self.activation}{'_glu' if self.glu else ''}{extra}"

    def summary(self) -> str:
        return f"routed experts ({self.E} experts, top-{self.k}, d={self.d}, f={self.f})"


@dataclass(frozen=True)
class MobaRecipe:
    """A MoBA core (`moec.ir.build.build_moba_graph`): packed sequences (``varlen``), the key
    convolution's width (``kconv``, 0 for none), the attention ``scheme``, ``outputs`` from out / lse /
    indices."""

    config: MobaConfig
    varlen: bool = False
    kconv: int = 0
    scheme: str = "auto"
    outputs: tuple = ("out",)
    kind = "moba"

    def build(self, dtype: torch.dtype) -> Graph:
        return build_moba_graph(self.config, dtype, varlen=self.varlen, kconv=self.kconv, scheme=self.scheme,
                                outputs=self.outputs)

    def summary(self) -> str:
        c = self.config
        return f"MoBA core (block {c.block_size}, top-{c.top_k}, heads {c.heads}/{c.kv_heads}, head dim {c.head_dim})"


@dataclass(frozen=True)
class BackwardRecipe:
    """The backward of an MoE layer (`MoERecipe`), of its routed experts (`ExpertsRecipe`) or of a MoBA
    core (`MobaRecipe`): `moec.ir.backward` builds its graph from the same description as the forward's.
    ``pre``: the gate/up products its forward saved (`moec.ir.backward.PRE_SAVED` roles), read rather than
    recomputed."""

    of: object
    pre: tuple = ()

    @property
    def kind(self) -> str:
        return f"{self.of.kind}_backward"

    def build(self, dtype: torch.dtype) -> Graph:
        r = self.of
        if isinstance(r, MoERecipe):
            return build_moe_backward_graph(r.spec, dtype, r.outputs, self.pre)
        if isinstance(r, MobaRecipe):
            return build_moba_backward_graph(r.config, dtype, varlen=r.varlen)
        return build_experts_backward_graph(r.E, r.k, r.d, r.f, r.activation, r.glu, dtype, r.bias, r.variant,
                                            self.pre)

    def summary(self) -> str:
        return f"backward of the {self.of.summary()}"


# ---- the result --------------------------------------------------------------------------------

@dataclass
class Compiled:
    """One compiled recipe: the IR after each pass and the program."""

    recipe: object
    dtype: torch.dtype
    arch: Arch
    stages: list[tuple[str, str]] = field(default_factory=list)   # (stage name, IR text)
    program: Optional[Program] = None
    tuned_from: str = ""            # "<device> in <file>" when the tune file had entries for this device
    generation: int = 0             # the tune file's generation it was compiled under

    @property
    def graph(self) -> Graph:
        return self.program.graph

    @property
    def spec(self):
        return getattr(self.recipe, "spec", None)

    def kernel_steps(self) -> list:
        return [s for s in self.program.steps if s.variants]

    @property
    def sources(self) -> dict:
        """``{kernel node: {bucket bound: source}}`` over `BUCKETS`: where each tile came from, as
        choose-tiles recorded it (``tile_source``)."""
        out = {}
        for s in self.kernel_steps():
            got = s.node.attr["tile_source"]
            out[s.node.name] = dict(got) if isinstance(got, dict) else dict.fromkeys(BUCKETS, got)
        return out

    def variant_source(self, step, variant) -> str:
        """Where a kernel variant's tile came from: "tune file", "cost model", "interpreter table",
        "table", or e.g. "tune file + cost model" when its folded buckets differ."""
        per_bucket = self.sources[step.node.name]
        got = [per_bucket[b] for (lo, _), b in zip(bucket_ranges(BUCKETS), BUCKETS) if step.variant(lo) is variant]
        return " + ".join(dict.fromkeys(got))

    @property
    def tune_notes(self) -> list[str]:
        """Tune file entries for this device that apply here but were ignored, and why (``tune_ignored``)."""
        return [f"{s.node.name} {bucket_key(b)}: tune entry ignored ({why})"
                for s in self.kernel_steps() for b, why in (s.node.attr["tune_ignored"] or {}).items()]

    def tiles(self) -> dict:
        """Per kernel node: its op and, per token-count bucket, the kernel, its tile and where the
        tile came from (``source``: see `variant_source`)."""
        return {s.node.name: {"op": s.node.op,
                              "buckets": {(bucket_text(*v.params.bucket) if getattr(v.params, "bucket", ())
                                           else "every T"):
                                          {"kernel": v.kernel.fn_name, **v.params.tile.as_dict(),
                                           "source": self.variant_source(s, v)}
                                          for v in s.variants}}
                for s in self.kernel_steps()}

    def dump(self, directory: str | Path, captured: str = "") -> Path:
        """Write ``captured.txt`` (what the frontend read), ``ir.NN.<stage>.txt`` (the IR after each
        pass), ``kernels/`` (every generated kernel) and ``tiles.json`` under ``directory``."""
        d = Path(directory)
        (d / "kernels").mkdir(parents=True, exist_ok=True)
        if captured:
            (d / "captured.txt").write_text(captured)
        for i, (name, text) in enumerate(self.stages):
            (d / f"ir.{i:02d}.{name}.txt").write_text(text)
        for step, kernel in self.program.kernels():
            (d / "kernels" / f"{step.node.name}.{kernel.fn_name}.py").write_text(kernel.source)
        (d / "tiles.json").write_text(json.dumps(self.tiles(), indent=2) + "\n")
        return d


# ---- the driver --------------------------------------------------------------------------------

def compile_program(recipe, dtype: torch.dtype, arch: Arch) -> Compiled:
    """Compile ``recipe`` for inputs of ``dtype`` on ``arch`` (memoised; see the module docstring)."""
    return _compile(recipe, dtype, arch, tune_file.generation())


@functools.lru_cache(maxsize=256)
def _compile(recipe, dtype: torch.dtype, arch: Arch, generation: int) -> Compiled:
    tuned = tune_file.lookup_for(arch)
    graph = recipe.build(dtype)
    out = Compiled(recipe, dtype, arch, [("captured", print_graph(graph))], generation=generation,
                   tuned_from=f"{tuned.device} in {tuned.path}" if tuned is not None else "")
    final = run_passes(graph, PassContext(arch, tuned, getattr(recipe, "saving", "")), passes=PIPELINES[recipe.kind],
                       after=lambda name, g: out.stages.append((name, print_graph(g))))
    out.program = lower(final, arch.name)
    _log.info("%s for %s on %s: %d kernel nodes, %d kernels", recipe.summary(), str(dtype).replace("torch.", ""),
              arch.name, len(out.kernel_steps()), len(out.program.kernels()))
    for node, info in out.tiles().items() if _tiles_log.isEnabledFor(logging.INFO) else ():
        for bucket, t in info["buckets"].items():
            tile = {k: v for k, v in t.items() if k not in ("kernel", "source")}
            _tiles_log.info("%s %s, %s: %s %s (%s)", node, info["op"], bucket, t["kernel"], tile, t["source"])
    return out


def compile_spec(spec: MoESpec, dtype: torch.dtype, outputs: tuple[str, ...], arch: Arch) -> Compiled:
    """`compile_program` of the MoE layer ``spec`` with ``outputs`` from y/logits/aux/weights."""
    return compile_program(MoERecipe(spec, tuple(outputs)), dtype, arch)


def cache_info():
    """The compile memo's hits and misses (`functools.lru_cache` statistics): one compile per recipe,
    dtype, arch and tune file generation."""
    return _compile.cache_info()
