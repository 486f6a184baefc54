"""Ahead-of-time checks for recorded launches, reusable by any kernel's tests.

Run a workload on CPU tensors under `moec.runtime.launch.recording()` (the Triton interpreter
executes it), keep each distinct launch (same source, signature, constexprs, warps, stages),
and compile it for GPU archs with `moec.runtime.aot.compile_launch` on this GPU-less machine.
bf16 is only ever compiled (the 3.9 interpreter gets bf16 `tl.dot` wrong), so a recording made
with fp16 tensors is re-typed with `retyped(record, "fp16", "bf16")` before compiling.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable

from moec.runtime import cache
from moec.runtime.aot import AotReport, compile_launch
from moec.runtime.launch import LaunchRecord, recording

ARCHS = ("sm80", "sm90", "sm100")
# under the large profile (or MOEC_AOT_ALL=1) every ahead-of-time check compiles for all of ARCHS
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "large" or os.environ.get("MOEC_AOT_ALL") == "1"


def aot_archs(*ci: str) -> tuple:
    """The archs one ahead-of-time check compiles for: ``ci`` by default (each check one or two archs, the checks
    together sm80's mma.sync, sm90's wgmma and sm100's tcgen05, so a suite run stays short), `ARCHS` under the
    large profile."""
    return ARCHS if LARGE else ci


def record_launches(workload: Callable[[], object]) -> list[LaunchRecord]:
    """Every launch ``workload()`` makes (it runs on CPU tensors, under the interpreter)."""
    with recording() as records:
        workload()
    return list(records)


def launch_key(record: LaunchRecord) -> tuple:
    return (cache.source_key(record.kernel.source), tuple(sorted(record.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in record.constexprs.items())), record.num_warps, record.num_stages)


def distinct_launches(records: Iterable[LaunchRecord]) -> list[LaunchRecord]:
    """One record per distinct compilation (the grid does not change the compiled kernel)."""
    seen: dict[tuple, LaunchRecord] = {}
    for r in records:
        seen.setdefault(launch_key(r), r)
    return list(seen.values())


def retyped(record: LaunchRecord, old: str = "fp16", new: str = "bf16") -> LaunchRecord:
    """The same launch with every ``*<old>`` pointer argument (and ``tensordesc<<old>[...]>`` descriptor) turned
    into ``*<new>``."""
    sig = {k: ("*" + new if v == "*" + old else v.replace(f"tensordesc<{old}[", f"tensordesc<{new}[", 1))
           for k, v in record.signature.items()}
    return dataclasses.replace(record, signature=sig)


def compile_all(records: Iterable[LaunchRecord], archs: Iterable[str] = ARCHS) -> list[tuple[LaunchRecord, AotReport]]:
    """Compile each record for each arch; returns (record, report) pairs."""
    return [(r, compile_launch(r, arch)) for r in records for arch in archs]
