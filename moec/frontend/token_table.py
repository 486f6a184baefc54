"""Routing by token id (hash routing): the choices come from a table the layer holds, indexed by the token ids
the forward is given (``experts = self.tid2eid[input_ids]``: DeepSeek-V4's first layers, hash layers).

`tables` proposes the integer tensors of the layer shaped like such a table (``[V, k]``, or ``[V]`` for one
choice); the probe then calls the forward with random token ids in ``[0, V)`` and, for the length of each
eager run, with the table filled with random expert ids (`scrambled`): a table of equal rows (a freshly
initialised one is all zeros) could not tell a lookup by token from any other. The compiled layer looks the
rows up as the forward does (`moec.reference.table_choices`) and hands them to the kernels.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import reference
from .call_shape import token_id_args

_INTS = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
_ID_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8)      # (uint8 and bool index as masks)


def resolve(module: nn.Module, path: str) -> torch.Tensor:
    """The tensor at a dotted path under ``module`` (``gate.tid2eid``)."""
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


@dataclass(frozen=True)
class TokenIds:
    """How a layer routes by token: the forward's argument ``arg`` holds the token ids, and the tensor at
    ``table`` (``[V, k]``, or ``[V]``: ``k = 1``) holds each token id's choices."""

    arg: str
    table: str
    vocab: int
    top_k: int

    def rows(self, module: nn.Module) -> torch.Tensor:
        """The table as ``[V, k]`` (a view of the layer's tensor, read afresh)."""
        t = resolve(module, self.table)
        return t.view(t.shape[0], 1) if t.dim() == 1 else t

    def describe(self) -> str:
        return (f"routing by token id: each token's {self.top_k} choice(s) are its row of {self.table} "
                f"[{self.vocab}, {self.top_k}], indexed by the forward's argument {self.arg}")


def tables(module: nn.Module) -> list:
    """`TokenIds` candidates: the forward's token-id argument with each integer tensor of the layer shaped like
    a table (``[V, k]`` with k <= 16, or ``[V]``), its first."""
    args = token_id_args(module)
    if not args:
        return []
    found = []
    named = list(module.named_buffers()) + list(module.named_parameters())
    for path, t in named:
        if t.dtype in _INTS and t.dim() in (1, 2) and t.shape[0] >= 2 and (t.dim() == 1 or 1 <= t.shape[1] <= 16):
            found.append(TokenIds(args[0], path, int(t.shape[0]), int(t.shape[1]) if t.dim() == 2 else 1))
    return found


def probe_tokens(lead: tuple, vocab: int, seed: int, device) -> torch.Tensor:
    """Random token ids in ``[0, vocab)`` shaped ``lead`` (the input's leading dims), the first of them the ids
    code most often treats apart (padding, begin and end of text: 0, 1, 2, 3 and ``vocab - 1``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (math.prod(lead),), generator=g)
    special = torch.tensor([0, 1, 2, 3, vocab - 1]).clamp(max=vocab - 1)[:ids.numel()]
    ids[:special.numel()] = special
    return ids.reshape(lead).to(device)


def mirrored(table: torch.Tensor) -> torch.Tensor:
    """``table`` with row ``V - 1 - v`` equal to row ``v``: ids ``v`` and ``V - 1 - v`` then choose alike, so a
    forward that reads the ids other than through the table answers differently for them."""
    half = table.shape[0] // 2
    out = table.clone()
    out[table.shape[0] - half:] = table[:half].flip(0)
    return out


def probe_table(module: nn.Module, ids: TokenIds, experts: int) -> torch.Tensor:
    """The random table the probe's runs see: expert ids in ``[0, experts)``, in the table's dtype and shape."""
    t = resolve(module, ids.table)
    g = torch.Generator().manual_seed(17)
    return torch.randint(0, experts, tuple(t.shape), generator=g).to(dtype=t.dtype, device=t.device)


@contextlib.contextmanager
def scrambled(module: nn.Module, ids: Optional[TokenIds], table: Optional[torch.Tensor]):
    """The layer's table holds ``table`` inside the block (written in place, restored after)."""
    if ids is None:
        yield
        return
    t = resolve(module, ids.table)
    saved = t.detach().clone()
    with torch.no_grad():
        t.copy_(table)
    try:
        yield
    finally:
        with torch.no_grad():
            t.copy_(saved)


class _Watched(torch.Tensor):
    """Token ids that note any torch operation on them (their values, shape, dtype read, or passed to an op)."""

    touched: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.touched.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def ignores_tokens(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    """The forward's token-id argument when the forward never reads the token ids it is given (no torch operation
    touches them, in both training modes, on ``x``) and returns the same, with the same effects, as without them:
    a layer that does not route by them (DeepSeek-V4's later layers take them too), whose compiled calls may then
    be given them; else None."""
    from .probe_harness import run_watched
    args = token_id_args(module)
    if not args:
        return None
    watched = type("Watched", (_Watched,), {"touched": []})
    for training in (module.training, not module.training):
        tokens = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device).as_subclass(watched)
        watched.touched.clear()
        try:
            plain, done = run_watched(module, (x,), module, training, x.device, 19)
            given, done_given = run_watched(lambda a: module(a, **{args[0]: tokens}), (x,), module, training,
                                            x.device, 19)
        except Exception:  # noqa: BLE001 - a forward that fails on either: not shown to ignore them
            return None
        if watched.touched or done or done_given:
            return None
        flat = [(a, b) for a, b in zip(_items(plain), _items(given))]
        if len(_items(plain)) != len(_items(given)) or not all(
                (a is None and b is None) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                                              and a.shape == b.shape and torch.equal(a, b)) for a, b in flat):
            return None
    return args[0]


def _items(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def bound_extras(forward, args: tuple, kwargs: dict) -> Optional[dict]:
    """The arguments of a call ``forward(self, x, *args, **kwargs)`` after the hidden states, by name (None: more
    positional arguments than the forward names, or one given twice)."""
    try:
        names = list(inspect.signature(forward).parameters)[2:]     # after self and the hidden states
    except (TypeError, ValueError):
        names = []
    given = dict(zip(names, args))
    if len(args) > len(names) or set(given) & set(kwargs):
        return None
    given.update(kwargs)
    return given


class CallChoices:
    """A compiled call's extra arguments: the table rows of the token ids the call passes, for a layer that
    routes by them (``forward(x, input_ids=...)``, by keyword or position), or token ids the forward ignores
    (``ignored``). The table's ids are checked to lie in ``[0, experts)`` once per change of the table (its
    address, version, shape), not at every call."""

    def __init__(self, ids: Optional[TokenIds], experts: int, ignored: tuple = ()):
        self.ids, self.experts, self.ignored = ids, experts, ignored
        self._checked: tuple = ((), None)

    def __call__(self, forward, module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
        """``(choices int64 [T, k] or None, None)``, or ``(None, why this call runs eager)``."""
        given = bound_extras(forward, args, kwargs)
        if given is None:
            return None, "extra forward arguments"
        tokens = given.pop(self.ids.arg, None) if self.ids is not None else None
        for name in self.ignored:
            given.pop(name, None)
        if given:
            return None, f"extra forward arguments ({', '.join(given)})"
        if self.ids is None:
            return None, None
        T = x.numel() // x.shape[-1] if x.dim() else 0
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in _ID_TYPES \
                or tokens.numel() != T or tokens.device != x.device:
            what = "none" if tokens is None else (f"{tokens.dtype} {list(tokens.shape)} on {tokens.device}"
                                                  if isinstance(tokens, torch.Tensor) else type(tokens).__name__)
            return None, (f"the layer routes by token id: {self.ids.arg} must be integer ids, one per token "
                          f"({T}) on {x.device}; got {what}")
        try:
            table = self.ids.rows(module)
        except Exception as e:  # noqa: BLE001 - a table replaced by something else: eager says what it does
            return None, f"the token table {self.ids.table} cannot be read as [V, {self.ids.top_k}]: {e}"
        why = self._table_ok(table)
        if why:
            return None, why
        choices = reference.table_choices(table, tokens)    # (an id outside [-V, V) raises, as in eager)
        if tuple(choices.shape) != (T, self.ids.top_k):
            return None, f"the token table's rows for this call are {list(choices.shape)}, not [{T}, {self.ids.top_k}]"
        # (on the CPU a check of the rows costs little: it also sees writes through ``.data``, which leave the
        # table's version as it was)
        if choices.device.type == "cpu" and not _experts_only(choices, self.experts):
            return None, f"the token table {self.ids.table} holds ids outside [0, {self.experts}) (read this call)"
        return choices, None

    def _table_ok(self, table: torch.Tensor) -> Optional[str]:
        key = (table.data_ptr(), table._version, tuple(table.shape), table.dtype, table.device)
        if self._checked[0] != key:
            bad = None
            if table.dim() != 2 or table.shape[1] != self.ids.top_k or table.dtype not in _INTS:
                bad = f"the token table {self.ids.table} is now {table.dtype} {list(table.shape)}"
            elif not _experts_only(table, self.experts):
                bad = (f"the token table {self.ids.table} holds ids outside [0, {self.experts}) (from "
                       f"{int(table.min())} to {int(table.max())})")
            self._checked = (key, bad)
        return self._checked[1]


def _experts_only(ids: torch.Tensor, experts: int) -> bool:
    """Whether every id lies in ``[0, experts)`` (reads them back: a host synchronisation on a GPU)."""
    return not ids.numel() or bool(((ids >= 0) & (ids < experts)).all())
