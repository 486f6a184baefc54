"""Launch a generated kernel and record what was launched.

`Kernel` wraps one rendered Triton source. Calling it with CPU tensors runs the Triton
interpreter; with CUDA tensors the compiled kernel. Every launch inside a `recording()` block
is kept as a `LaunchRecord` (grid, argument signature, constexprs, warps, stages): the dump
writes them out and the ahead-of-time tests recompile each one for every GPU arch.

`in_launch()` is true while a kernel itself runs (after its grid and arguments are fixed): the
Triton interpreter moves tensors to and from numpy then, which is the launch, not host code of
moec's. tests/test_graph_safety.py watches every torch op of a call outside launches (no host
synchronisation, no allocation that depends on the routing) and compares the recorded grids and
scalar arguments across routings.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field, replace

import torch
import triton.language as tl
from triton.language import core as tl_core
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

try:        # Triton 3.6 and 3.9: host-side TMA descriptors (`moec.runtime.grouped_gemm_kernel`)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:                         # pragma: no cover - an older Triton: no TMA variant
    TensorDescriptor = None

from . import cache

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("moec_recorder", default=None)
_launching: contextvars.ContextVar[bool] = contextvars.ContextVar("moec_launching", default=False)


def is_recording() -> bool:
    """True inside a `recording()` block."""
    return _recorder.get() is not None


def in_launch() -> bool:
    """True inside a kernel launch proper (see the module docstring)."""
    return _launching.get()


@dataclass(frozen=True)
class LaunchRecord:
    kernel: "Kernel"
    grid: tuple
    signature: dict      # argument name -> Triton type ("*fp16", "i32", ...)
    constexprs: dict
    num_warps: int
    num_stages: int
    specialization: dict = field(default_factory=dict)   # argument name -> "1" | "D" (see `specialize`)
    scalars: dict = field(default_factory=dict)          # argument name -> value, non-tensor arguments

    def describe(self) -> dict:
        return {"kernel": self.kernel.fn_name, "source_key": cache.source_key(self.kernel.source),
                "grid": list(self.grid), "signature": self.signature, "constexprs": self.constexprs,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


@contextlib.contextmanager
def recording():
    """Collect every launch made inside the block into the yielded list."""
    records: list[LaunchRecord] = []
    token = _recorder.set(records)
    try:
        yield records
    finally:
        _recorder.reset(token)


def specialize(value) -> str:
    """How Triton's JIT specializes an argument value: ``"1"`` (an int equal to 1 becomes a
    constant), ``"D"`` (an int, or a tensor's address, divisible by 16), or ``""``. Recorded so
    that an ahead-of-time compile sees what the JIT would (divisibility decides vector widths,
    and so whether loads are pipelined and how much shared memory a kernel takes)."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        return ""
    if isinstance(value, torch.Tensor):
        return "D" if value.data_ptr() % 16 == 0 else ""
    if value == 1:
        return "1"
    return "D" if value % 16 == 0 else ""


def triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        return f"tensordesc<{_DTYPES[value.base.dtype]}[{', '.join(str(b) for b in value.block_shape)}]>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot pass {type(value).__name__} to a Triton kernel")


@contextlib.contextmanager
def _interpretable_stdlib():
    """Let interpreted kernels call Triton's own ``@triton.jit`` helpers (``tl.sum``, ``tl.cdiv``...).

    Those helpers were decorated when Triton was imported, in compiled mode (this process also
    compiles kernels ahead of time), and refuse to be called outside a compiled kernel. While an
    interpreted kernel runs, a call to such a helper runs its interpreter rewrite instead.
    """
    original = JITFunction.__call__

    def call(self, *args, **kwargs):
        fn = _INTERPRETED.get(self.fn)
        if fn is None:
            fn = _INTERPRETED[self.fn] = InterpretedFunction(self.fn).rewrite()
        return fn(*args, **kwargs)

    with _INTERPRET_LOCK:
        # The helpers call into tl.core, which the kernel's own patch (tl only) leaves compiled:
        # patch tl and tl.core for the interpreter once for the whole launch, not on every call.
        # This scope is entered before the kernel's and left after it, so each restores in turn.
        scope = _patch_lang(_sees_tl_and_core)
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = original
            scope.restore()


def _sees_tl_and_core():
    """Triton's ``_patch_lang(fn)`` patches the language modules named in ``fn``'s globals."""
    return tl, tl_core


_INTERPRETED: dict = {}     # a helper's Python function -> its interpreter rewrite
_INTERPRET_LOCK = threading.RLock()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (Triton's own helpers are constexpr functions, slower on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(eq=False)
class Kernel:
    """One rendered kernel source whose ``@triton.jit`` function is ``fn_name``."""

    source: str
    fn_name: str
    arg_names: tuple = field(default=())
    _functions: dict = field(default_factory=dict, repr=False)     # interpret -> the loaded function

    def function(self, interpret: bool):
        """The ``@triton.jit`` function, loaded once per kernel (no hashing of the source per launch)."""
        fn = self._functions.get(interpret)
        if fn is None:
            fn = self._functions[interpret] = getattr(cache.load(self.source, self.fn_name, interpret), self.fn_name)
        return fn

    def __call__(self, grid: tuple, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 2):
        """Launch on ``grid``; ``args`` in the kernel's parameter order (a dict, names checked)."""
        Launcher(self, constexprs, num_warps, num_stages, tuple(args))(grid, tuple(args.values()))


class Launcher:
    """A kernel with its constexprs, warps and stages bound: a call passes only the grid and the
    positional arguments (``names``: the kernel's parameter names, for launch records). Made once per
    launch plan, so a decode step's launch builds no dicts."""

    __slots__ = ("kernel", "constexprs", "num_warps", "num_stages", "names")

    def __init__(self, kernel: Kernel, constexprs: dict, num_warps: int = 4, num_stages: int = 2,
                 names: tuple = ()):
        self.kernel, self.constexprs = kernel, constexprs
        self.num_warps, self.num_stages = num_warps, num_stages
        self.names = names or kernel.arg_names

    def __call__(self, grid: tuple, args: tuple) -> None:
        if 0 in grid:
            return
        first = args[0] if isinstance(args[0], torch.Tensor) else next(
            (a for a in args if isinstance(a, torch.Tensor)), None)
        interpret = first is not None and first.is_cpu
        fn = self.kernel.function(interpret)
        records = _recorder.get()
        if records is not None:
            records.append(self.record(grid, args))
        token = _launching.set(True)
        try:
            if interpret:
                with _interpretable_stdlib():
                    fn[grid](*args, **self.constexprs)
            else:
                fn[grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)
        finally:
            _launching.reset(token)

    def record(self, grid: tuple, args: tuple) -> LaunchRecord:
        """The `LaunchRecord` of a launch with these arguments (works for ``meta`` tensors: nothing runs)."""
        named = {k: v for k, v in zip(self.names, args, strict=True) if v is not None}
        return LaunchRecord(self.kernel, tuple(grid), {k: triton_type(v) for k, v in named.items()},
                            dict(self.constexprs), self.num_warps, self.num_stages,
                            {k: s for k, s in ((k, specialize(v)) for k, v in named.items()) if s},
                            {k: v for k, v in named.items() if isinstance(v, (int, float))})


# a launch, prepared: run it, or turn it into a record without running it (AOT checks of big tiles)

@dataclass
class LaunchPlan:
    kernel: Kernel
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel(self.grid, self.args, self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def record(self) -> LaunchRecord:
        """The `LaunchRecord` running it would make (works for ``meta`` tensors: nothing runs)."""
        rec = Launcher(self.kernel, self.constexprs, self.num_warps, self.num_stages, tuple(self.args))
        return replace(rec.record(self.grid, tuple(self.args.values())), scalars={})
