"""What every compiled region shares at run time, whatever it computes (an MoE layer, a MoBA core,
transformers' experts): its programs, the eager fallback and its reasons, dumps and the report.

A `Region` is attached to a module in place (`moec.api`). Subclasses (`moec.moe_region.MoERegion`,
`moec.moba_region.MobaRegion`, `moec.hf.experts.ExpertsRegion`) read the call and say which recipe
to run; the base

- compiles through the one driver (`moec.compiler.compile_program`) once per (recipe, dtype, arch)
  and again, once, after the tune file changed, dumping each new program (``dump_dir``) and telling
  ``on_compile`` (which rewrites ``explain.txt``);
- runs a program, recording its launches into the dump the first time;
- counts every call by what served it (``"kernels"``, ``"kernels forward and backward"``, ``"backward: kernels"``,
  ``"eager: <reason>"``), which ``explain()`` reports.

`disabled()` makes every region run its eager code.
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from moec import env
from moec.passes.save_activations import POLICIES
from moec.runtime import launch, tune_file
from moec.runtime.arch import resolve

from .compiler import Compiled, compile_program
from .log import logger

_state = threading.local()
_log = logger("calls")


@contextlib.contextmanager
def disabled():
    """Run every compiled region as its original eager code inside this block."""
    old = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = old


def is_disabled() -> bool:
    return getattr(_state, "disabled", False)


def being_traced() -> bool:
    """Whether the call is being traced into a graph (torch.compile, torch.jit, fx): kernels that read data
    pointers cannot be."""
    fx = torch.fx._symbolic_trace
    symbolic = fx.is_fx_symbolic_tracing() if hasattr(fx, "is_fx_symbolic_tracing") else fx._is_fx_tracing_flag
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or symbolic


def activations_policy(value: Optional[str] = None) -> str:
    """``value`` (`moec.compile`'s ``activations``), else ``MOEC_ACTIVATIONS``, else ``"auto"``; checked."""
    got = value or env.text("MOEC_ACTIVATIONS") or "auto"
    if got not in POLICIES:
        where = "activations" if value else "environment variable MOEC_ACTIVATIONS"
        raise ValueError(f"{where}={got!r}: expected one of {', '.join(map(repr, POLICIES))} (what a training "
                         f"forward keeps for its backward: the gate/up products, or nothing and recompute them)")
    return got


MODES = ("default", "reduce-overhead")


def check_mode(mode: str) -> str:
    """``mode`` (`moec.compile`'s), checked: ``"default"``, or ``"reduce-overhead"`` (CUDA graphs)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(map(repr, MODES))} ('reduce-overhead' "
                         f"replays each MoE layer's kernels as a CUDA graph per token count on a GPU)")
    return mode


def empty_with_grad(rows: int) -> Optional[str]:
    """Why a call of ``rows`` tokens runs eager: an empty batch with gradients (which tensors eager's empty
    forward reaches decides ``requires_grad`` and which gradients stay None), else None."""
    if rows == 0 and torch.is_grad_enabled():
        return "no tokens, with gradients (which tensors eager's empty forward reaches decides its gradients)"
    return None


def dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(eq=False)
class Region:
    name: str
    arch: Optional[str] = None                 # an explicit target (tiles); None: the device decides
    dump_dir: Optional[Path] = None
    activations: Optional[str] = None          # training: save or recompute (`saving`); None: MOEC_ACTIVATIONS
    mode: str = "default"                      # "reduce-overhead": CUDA graphs of inference calls (`MoERegion`)
    calls: Counter = field(default_factory=Counter)
    compiled: dict = field(default_factory=dict)        # (recipe, dtype, arch) -> Compiled
    on_compile: Optional[Callable] = None
    _launches_dumped: set = field(default_factory=set)

    def __reduce__(self):
        """A region is runtime state (compiled programs, counters): a pickled or deep-copied module
        gets none, and its owner makes a new one (`moec.api` recompiles the module it compiled)."""
        return _no_region, ()

    # ---- compile and run ---------------------------------------------------------------------
    @property
    def saving(self) -> str:
        """The activations policy of a forward whose backward will run (passes/save_activations.py):
        ``activations`` given to `moec.compile`, else ``MOEC_ACTIVATIONS`` as it was when the region was made
        (or first asked), else ``"auto"``: settled once, so a later change of the environment cannot break
        a compiled model's calls."""
        if self.activations is None:
            self.activations = activations_policy()
        return self.activations

    def compiled_for(self, recipe, dtype: torch.dtype, device) -> Compiled:
        """The program of ``recipe`` for ``dtype`` on ``device`` (an explicit ``arch`` on a CPU picks its
        tiles, run interpreted): compiled at the first call, and again, once, after the tune file
        changed in this process, so a tuned module never keeps its old tiles silently."""
        arch = resolve(self.arch, device)
        key = (recipe, dtype, arch)
        c = self.compiled.get(key)
        if c is None or c.generation != tune_file.generation():
            c = self.compiled[key] = compile_program(recipe, dtype, arch)
            if self.dump_dir is not None:
                c.dump(self.dump_path(c), self.captured())
            if self.on_compile is not None:
                self.on_compile()
        return c

    def run(self, c: Compiled, inputs: dict, program=None, **kwargs):
        """Run ``c``'s program (`Program.run`'s keywords; ``program``: it bound to weights, `Program.bind`);
        the first run of each program in a dump also writes its launches (``launches.json``)."""
        runner = program if program is not None else c.program
        if self.dump_dir is None or id(c) in self._launches_dumped:
            return runner.run(inputs, **kwargs)
        with launch.recording() as records:
            got = runner.run(inputs, **kwargs)
        self._launches_dumped.add(id(c))
        sizes = {str(s): v for s, v in c.program.sizes({**getattr(runner, "bound", {}), **inputs}).items()}
        doc = {**sizes, "launches": [r.describe() for r in records]}
        (self.dump_path(c) / "launches.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return got

    def serve(self, what: str, fn: Callable, *args):
        """``fn(*args)``, counted as ``what`` once it returned; a call that raised is counted as
        failed (with the error's type), so ``explain()`` says what really happened."""
        try:
            out = fn(*args)
        except Exception as e:
            self._count(f"failed ({what}): {type(e).__name__}")
            raise
        self._count(what)
        return out

    def _count(self, what: str) -> None:
        if what not in self.calls:
            _log.info("%s: first call served by %s", self.name, what)
        self.calls[what] += 1

    def eager(self, reason: str, fn: Callable, *args, **kwargs):
        """Run the eager code ``fn`` and count why."""
        self._count(f"eager: {reason}")
        return fn(*args, **kwargs)

    # ---- dumps -------------------------------------------------------------------------------
    def dump_path(self, c: Compiled) -> Path:
        """This program's folder under ``dump_dir``; every character of a module's name that is not a
        letter, digit, ``_`` or ``-`` becomes ``_``, so no name can reach outside ``dump_dir``."""
        name = re.sub(r"[^\w-]", "_", self.name, flags=re.ASCII)
        backward = (".backward" + (".saved" if getattr(c.recipe, "pre", ()) else "")
                    if c.recipe.kind.endswith("_backward") else ".train" if getattr(c.recipe, "saving", "") else "")
        d = self.dump_dir / f"{name}.{dtype_text(c.dtype)}.{c.arch.name}{self.dump_suffix(c)}{backward}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def dump_suffix(self, c: Compiled) -> str:
        """Tells apart the programs of one region for one dtype and arch (MoBA: other head shapes)."""
        return ""

    def captured(self) -> str:
        """What the frontend read off the module (``captured.txt`` in a dump)."""
        return ""

    # ---- report ------------------------------------------------------------------------------
    def report(self, qualname: str, cls: str) -> list[str]:
        """explain()'s lines for this region (``qualname``/``cls``: the module it is attached to)."""
        return []

    def program_lines(self) -> list[str]:
        """Per compiled program: its kernels with their tiles (one line per kernel and token-count
        bucket), torch steps, where tiles came from, whether a call can be captured in a CUDA graph."""
        lines = []
        for c in self.compiled.values():
            where = "the CPU (Triton's interpreter)" if c.arch.name == "cpu" else c.arch.name
            what = "backward compiled" if c.recipe.kind.endswith("_backward") else "compiled"
            lines.append(f"{what} for {dtype_text(c.dtype)} on {where}{self.program_note(c)}:")
            lines += [f"  {line}" for s in c.kernel_steps() for line in _kernel_lines(s, c)]
            lines += _tile_lines(c)
            if c.program.torch_steps():
                lines.append(f"torch steps (not generated kernels): {', '.join(c.program.torch_steps())}")
            lines.append(_graph_line(c.program))
        return lines

    def program_note(self, c: Compiled) -> str:
        return ""

    def call_lines(self) -> list[str]:
        return [f"calls: {n} x {what}" for what, n in sorted(self.calls.items())]


def _kernel_lines(step, c: Compiled) -> list[str]:
    """``op: kernel, tile ...`` per token-count bucket (the kernel name says which); tiles taken from
    the tune file are marked ``(tuned)``, or ``(partly tuned)`` when only some of the buckets the
    kernel serves have an entry (the others' model tile happened to equal it)."""
    def mark(v):
        source = c.variant_source(step, v)
        return "" if "tune file" not in source else " (tuned)" if source == "tune file" else " (partly tuned)"
    return [f"{step.node.op}: {v.kernel.fn_name}, {tile_text(v.params.tile)}{mark(v)}" for v in step.variants]


def tile_text(t) -> str:
    """``tile 16x64x32, 4 warps, 2 stages``: the tile's block sizes, then how it runs."""
    d = t.as_dict()
    blocks = "x".join(str(v) for k, v in d.items() if k.startswith("block"))
    stages = d["num_stages"]
    return f"tile {blocks}, {d['num_warps']} warps, {stages} stage{'s' if stages != 1 else ''}"


def _no_region():
    return None


def _tile_lines(c: Compiled) -> list[str]:
    """Where the program's tiles came from, and every tune entry for this device that was ignored."""
    sources = [src for per_bucket in c.sources.values() for src in per_bucket.values()]
    if not sources or set(sources) <= {"interpreter table", "table"}:
        return []
    if not c.tuned_from:
        lines = [f"tiles: the cost model's for {c.arch.name} (no tune file entries for this device; moec.tune times "
                 "candidates)"]
    else:
        lines = [f"tiles: {sources.count('tune file')} of {len(sources)} kernel buckets from the tune file "
                 f"({c.tuned_from}), the rest the cost model's"]
    return lines + [f"tune file entry ignored: {note}" for note in c.tune_notes]


def _graph_line(program) -> str:
    if program.graph_safe:
        return "CUDA graphs: a call can be captured (no host synchronisation; buffers and grids sized from shapes)"
    steps = ", ".join(dict.fromkeys(program.graph_unsafe_steps()))
    return f"CUDA graphs: not capturable: {steps} run the reference's torch code, which synchronises with the host"
