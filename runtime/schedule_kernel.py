"""The tile schedule: which expert and rows each row tile of a routed grouped GEMM owns.

A routed grouped GEMM's row tiles never cross experts: expert ``e``'s ``c_e`` pairs make
``ceil(c_e / BLOCK_M)`` tiles, numbered in expert order. Without a schedule each program finds its
tile's expert by loading all ``E + 1`` offsets and summing tiles over the experts (a cumsum). The
schedule does that once per call, for every tile: an int32 vector of ``3 M + 1`` entries (``M``:
the pair count, an upper bound on the tiles):

- ``schedule[0]``: the number of row tiles;
- ``schedule[1 + i]``: tile ``i``'s expert;
- ``schedule[1 + M + i]``: its first row (in sorted pair order);
- ``schedule[1 + 2 M + i]``: its expert's row end (rows past it in the tile are masked).

Entries past the tile count are never written nor used. It is written by the routing kernel when that
sorts the pairs itself (the decode token counts), else by the one-program kernel here, on the device
after the sort: no host synchronisation either way.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .launch import Kernel, Launcher, next_pow2
from .render import render

ARG_NAMES = ("offsets_ptr", "sched_ptr", "M")


def schedule_size(pairs: int) -> int:
    """Entries of the schedule of ``pairs`` pairs."""
    return 3 * pairs + 1


def schedule_chunk(e_pad: int) -> int:
    """Tiles the schedule writes per step: a ``[chunk, E_PAD]`` comparison of at most 4096 entries."""
    return max(16, min(128, 4096 // e_pad))


@dataclass(frozen=True)
class ScheduleParams:
    num_experts: int
    block_m: int
    header: str = ""                    # the dispatching node's text line

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.block_m < 1 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two, got {self.block_m}")


@functools.lru_cache(maxsize=None)
def render_schedule(params: ScheduleParams) -> Kernel:
    """The kernel for ``params`` (rendered once per distinct params)."""
    name = f"tile_schedule_m{params.block_m}"
    source = render("tile_schedule.py.jinja", fn_name=name, header=re.sub(r"\s+", " ", params.header).strip(),
                    num_experts=params.num_experts, block_m=params.block_m)
    return Kernel(source, name, ARG_NAMES)


class ScheduleLaunch:
    """The schedule kernel's launch, worked out once per params (`schedule_launch`)."""

    __slots__ = ("launcher",)

    def __init__(self, params: ScheduleParams):
        e_pad = max(2, next_pow2(params.num_experts))
        constexprs = dict(E=params.num_experts, E_PAD=e_pad, SCHED_M=params.block_m, SCHED_S=schedule_chunk(e_pad))
        self.launcher = Launcher(render_schedule(params), constexprs, 4, 1)

    def __call__(self, offsets: Tensor, pairs: int) -> Tensor:
        if pairs == 0:              # no pairs, no tiles: nothing to launch
            return torch.zeros(1, dtype=torch.int32, device=offsets.device)
        sched = torch.empty(schedule_size(pairs), dtype=torch.int32, device=offsets.device)
        self.launcher((1,), (offsets, sched, pairs))
        return sched


@functools.lru_cache(maxsize=None)
def schedule_launch(params: ScheduleParams) -> ScheduleLaunch:
    """The launch of ``params``' kernel (made once per distinct params: it holds no per-call state)."""
    return ScheduleLaunch(params)


def tile_schedule(offsets: Tensor, pairs: int, params: ScheduleParams) -> Tensor:
    """The schedule (see the module docstring) of ``pairs`` pairs grouped by expert as ``offsets`` (int32
    ``[E + 1]``, from `moec.runtime.dispatch.dispatch`) says, for tiles of ``params.block_m`` rows."""
    E = params.num_experts
    if tuple(offsets.shape) != (E + 1,) or offsets.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 [E+1={E + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    if pairs < 0:
        raise ValueError(f"pairs must be >= 0, got {pairs}")
    return schedule_launch(params)(offsets, pairs)
