"""Value types of the IR: a dtype and a shape whose dims are integers or sympy expressions of T.

``T`` is the token count: symbolic, so one compiled graph serves every batch size and tile
counts are expressions (``ceiling(2*T/16) + 8``) that the runtime evaluates at launch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import sympy
import torch

T = sympy.Symbol("T", integer=True, nonnegative=True)
B = sympy.Symbol("B")          # batch (MoBA): a plain symbol, so the text form parses back to it
S = sympy.Symbol("S")          # packed sequences (MoBA's cu_seqlens: i32[S + 1])
SYMBOLS = {"T": T, "B": B, "S": S}

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
          "i32": torch.int32, "i64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dim(value) -> sympy.Expr:
    """A dim as a sympy expression (ints become sympy Integers)."""
    return sympy.sympify(value, locals=SYMBOLS)


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"moec does not handle dtype {dtype}")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorType:
    dtype: str                 # one of DTYPES
    shape: tuple               # of sympy expressions

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "shape", tuple(dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def concrete(self, **sizes: int) -> tuple[int, ...]:
        """The shape with symbols bound (``T=7``)."""
        subs = {SYMBOLS[k]: v for k, v in sizes.items()}
        return tuple(int(d.subs(subs)) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def binders(inputs) -> list[tuple[str, int, sympy.Symbol, int]]:
    """How a call's sizes bind the symbols of graph ``inputs`` (``(name, type)`` pairs): per symbol, the
    first ``(input, dim, symbol, offset)`` whose dim is the symbol plus an integer (``T``, ``S + 1``)."""
    out, seen = [], set()
    for name, t in inputs:
        for i, d in enumerate(t.shape):
            syms = d.free_symbols
            if len(syms) != 1:
                continue
            (sym,) = syms
            offset = d - sym
            if sym not in seen and offset.is_Integer:
                seen.add(sym)
                out.append((name, i, sym, int(offset)))
    return out


def bind_sizes(binds, tensors: dict) -> dict:
    """``{symbol: int}`` read off the tensors' shapes by `binders`."""
    return {sym: tensors[name].shape[i] - off for name, i, sym, off in binds}


def condition(text: str) -> sympy.Basic:
    """A shape condition (``select``'s ``when``): a sympy relation of the IR's symbols."""
    cond = sympy.sympify(text, locals=SYMBOLS)
    if not isinstance(cond, (sympy.core.relational.Relational, sympy.logic.boolalg.Boolean)) or \
            not cond.free_symbols <= set(SYMBOLS.values()):
        raise ValueError(f"not a condition on {sorted(SYMBOLS)}: {text!r}")
    return cond


_TYPE_RE = re.compile(r"^\s*(\w+)\[(.*)\]\s*$")


def parse_type(text: str) -> TensorType:
    m = _TYPE_RE.match(text)
    if not m:
        raise ValueError(f"not a tensor type: {text!r}")
    body = m.group(2).strip()
    dims = [dim(p) for p in _split_top(body)] if body else []
    return TensorType(m.group(1), tuple(dims))


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]
