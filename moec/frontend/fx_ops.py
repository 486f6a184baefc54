"""The frontend's fx vocabulary: one normalised name per node, and the walks both recognisers make.

`op_name(node)` names what a node computes whatever the spelling: ``torch.matmul``, ``@``,
``.bmm`` and ``.mm`` are all "matmul"; ``torch.reshape`` and ``.reshape`` are "reshape" (``.view``
is "view": it is another op, it needs a contiguous input); ``nn.Softmax``, ``F.softmax`` and
``.softmax`` are "softmax". Ops that readers often accept as one family have a set here
(`MATMULS`: "matmul" and "einsum"; `RESHAPES`; `MAXES`), so a reader says which family it means
instead of the table conflating ops. An op missing from the table keeps its own name (a function's
``__name__``, a method's name; "module" for other submodules).

The walks: `data_operand(node)` is the tensor a layout op, cast, gather or constant scale passes on;
`chain` follows one tensor back through them to where it is made and `source` is that end; `search`
looks backwards through a set of op names for the first node of another set; `ancestors` and
`descendants` are plain reachability. A node's value (``node.meta["val"]``) exists only in graphs
from the shape-specialised tracer; without one, a ``getitem`` is never taken for tensor indexing.
"""
from __future__ import annotations

import builtins
import operator
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

_FUNCTIONS: dict = {}
_METHODS: dict = {}


def _name(name: str, functions=(), methods=()) -> None:
    for f in functions:
        if f is not None:
            _FUNCTIONS[f] = name
    for m in methods:
        _METHODS[m] = name


_name("softmax", (torch.softmax, F.softmax, getattr(torch.special, "softmax", None)), ("softmax",))
_name("sigmoid", (torch.sigmoid, F.sigmoid, getattr(torch.special, "expit", None)), ("sigmoid",))
_name("softplus", (F.softplus,))
_name("silu", (F.silu,))
_name("relu", (F.relu, torch.relu), ("relu",))
_name("gelu", (F.gelu,))
_name("tanh", (torch.tanh, F.tanh), ("tanh",))
_name("linear", (F.linear,))
_name("matmul", (torch.matmul, operator.matmul, torch.mm, torch.bmm), ("matmul", "mm", "bmm", "__matmul__"))
_name("einsum", (torch.einsum, torch.functional.einsum))
_name("sdpa", (F.scaled_dot_product_attention,))
_name("topk", (torch.topk,), ("topk",))
_name("argmax", (torch.argmax,), ("argmax",))
_name("max", (torch.max,), ("max",))
_name("amax", (torch.amax,), ("amax",))
_name("min", (torch.min,), ("min",))
_name("amin", (torch.amin,), ("amin",))
_name("sum", (torch.sum,), ("sum",))
_name("mean", (torch.mean,), ("mean",))
_name("logsumexp", (torch.logsumexp,), ("logsumexp",))
_name("add", (operator.add, operator.iadd, torch.add), ("add", "add_"))
_name("sub", (operator.sub, operator.isub, torch.sub), ("sub", "sub_"))
_name("mul", (operator.mul, operator.imul, torch.mul), ("mul", "mul_"))
_name("div", (operator.truediv, operator.itruediv, torch.div, torch.true_divide), ("div", "div_"))
_name("randn", (torch.randn_like, torch.randn, torch.normal, torch.rand_like), ("normal_",))   # noise draws
_name("where", (torch.where,), ("where",))
_name("masked_fill", (torch.masked_fill,), ("masked_fill", "masked_fill_"))
_name("getitem", (operator.getitem,))
_name("setitem", (operator.setitem,))
_name("getattr", (builtins.getattr,))
_name("chunk", (torch.chunk,), ("chunk",))
_name("split", (torch.split,), ("split",))
_name("cat", (torch.cat, torch.concat), ("concat",))
_name("stack", (torch.stack,))
_name("reshape", (torch.reshape,), ("reshape",))
_name("transpose", (torch.transpose, torch.t), ("transpose", "t", "swapaxes"))
_name("permute", (torch.permute,))
_name("unsqueeze", (torch.unsqueeze,))
_name("squeeze", (torch.squeeze,))
_name("flatten", (torch.flatten,))
_name("repeat_interleave", (torch.repeat_interleave,))
_name("pad", (F.pad,))
_name("gather", (torch.gather,))
_name("index_select", (torch.index_select,))
_name("take_along_dim", (torch.take_along_dim,))
_name("clone", (torch.clone,))
_name("tril", (torch.tril,))
_name("dropout", (F.dropout,))

_MODULES = ((nn.Softmax, "softmax"), (nn.Sigmoid, "sigmoid"), (nn.Softplus, "softplus"), (nn.SiLU, "silu"),
            (nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.Tanh, "tanh"), (nn.Linear, "linear"),
            (nn.Dropout, "dropout"), (nn.Identity, "identity"))

MATMULS = frozenset({"matmul", "einsum"})
RESHAPES = frozenset({"view", "reshape"})
MAXES = frozenset({"max", "amax"})
ACTIVATION_OPS = ("silu", "gelu", "gelu_tanh", "relu", "tanh")
# casts: the same values in another dtype or memory layout
CASTS = frozenset({"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone", "detach"})
# ops that pass one tensor on rearranged or selected (the first argument is that tensor)
LAYOUT = CASTS | {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
                  "expand", "expand_as", "repeat", "repeat_interleave", "pad", "narrow", "unfold", "getitem",
                  "gather", "index_select", "take_along_dim", "getattr"}


def resolve_attr(root: nn.Module, target: str):
    """``root.<target>`` without going through ``nn.Module.__getattr__`` (patched while tracing)."""
    obj = root
    for part in target.split("."):
        if isinstance(obj, nn.Module):
            for d in (obj._parameters, obj._buffers, obj._modules, obj.__dict__):
                if part in d:
                    obj = d[part]
                    break
            else:
                raise AttributeError(f"{type(obj).__name__} has no attribute {part!r}")
        else:
            obj = getattr(obj, part)
    return obj


def op_name(n, root: Optional[nn.Module] = None) -> Optional[str]:
    """The normalised name of what node ``n`` computes (None for a non-node). A submodule call is
    named by its class when ``root`` (the traced module) is given, else it is "module"; other node
    kinds are named by their op ("placeholder", "get_attr", "output")."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function":
        name = _FUNCTIONS.get(n.target) or getattr(n.target, "__name__", None)
        return "gelu_tanh" if name == "gelu" and n.kwargs.get("approximate", "none") == "tanh" else name
    if n.op == "call_method":
        return _METHODS.get(n.target, n.target)
    if n.op == "call_module":
        m = resolve_attr(root, n.target) if root is not None else None
        for cls, name in _MODULES:
            if isinstance(m, cls):
                return "gelu_tanh" if name == "gelu" and getattr(m, "approximate", "none") == "tanh" else name
        return "module"
    return n.op


_INPLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv)


def is_inplace(n: fx.Node) -> bool:
    """Whether ``n`` writes into its first argument (``t[i] = x``, ``t.masked_fill_(...)``)."""
    if n.op == "call_function":
        return n.target in _INPLACE_OPERATORS
    return n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__")


# ----------------------------------------------------------------------------------------------
# Arguments and values
# ----------------------------------------------------------------------------------------------

def arg(n: fx.Node, pos: int, name: str, default=None):
    """``n``'s argument at position ``pos`` or keyword ``name``."""
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


def int_arg(n: fx.Node, pos: int, name: str) -> Optional[int]:
    """``n``'s literal int argument at ``pos`` or keyword ``name`` (None: absent or not an int)."""
    v = arg(n, pos, name)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def val(n):
    """The (meta) value the shape-specialised tracer recorded for ``n``; None elsewhere."""
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor(n) -> bool:
    return isinstance(val(n), torch.Tensor)


# ----------------------------------------------------------------------------------------------
# Walks
# ----------------------------------------------------------------------------------------------

def _const_scale(n: fx.Node) -> Optional[fx.Node]:
    """The tensor operand of ``x * c`` / ``x / c`` with a Python number ``c``."""
    k = op_name(n)
    if k in ("mul", "div") and len(n.args) == 2:
        a, b = n.args
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return a
        if k == "mul" and isinstance(b, fx.Node) and isinstance(a, (int, float)):
            return b
    return None


def data_operand(n: fx.Node) -> Optional[fx.Node]:
    """The tensor a layout op / cast / gather / constant scale passes on (None for other ops)."""
    k = op_name(n)
    if k == "getattr":
        return n.args[0] if n.args[1] in ("T", "mT", "mH", "data") else None
    if k == "getitem" and not is_tensor(n.args[0]):
        return None                           # indexing a tuple (topk(...)[1]) is not a layout op
    if k in LAYOUT and n.args and isinstance(n.args[0], fx.Node):
        return n.args[0]
    return _const_scale(n)


def chain(n: fx.Node) -> list[fx.Node]:
    """``n`` and the nodes it passes on from, through layout ops, casts and constant scales; the
    first other node ends the chain (and is its last element)."""
    out = [n]
    while (d := data_operand(out[-1])) is not None and d not in out:
        out.append(d)
    return out


def source(n):
    """Where the tensor ``n`` is made: the end of its `chain` (``n`` itself when it is no node)."""
    return chain(n)[-1] if isinstance(n, fx.Node) else n


def strip(n, names=CASTS, root: Optional[nn.Module] = None):
    """``n`` with the ops named in ``names`` (pass-throughs of their first argument) peeled off."""
    while isinstance(n, fx.Node) and op_name(n, root) in names and n.args:
        n = n.args[0]
    return n


def search(start, allowed, want, depth=16) -> Optional[fx.Node]:
    """Backwards from ``start`` through ops in ``allowed`` (and layout ops): the first node whose name
    is in ``want``."""
    todo, seen = [(start, 0)], set()
    while todo:
        n, d = todo.pop(0)
        if not isinstance(n, fx.Node) or n in seen or d > depth:
            continue
        seen.add(n)
        if op_name(n) in want:
            return n
        if op_name(n) in allowed or data_operand(n) is not None:
            todo += [(a, d + 1) for a in n.all_input_nodes if is_tensor(a)]
    return None


def operands(mm: fx.Node) -> list[fx.Node]:
    """The tensor operands of a matmul or einsum."""
    args = mm.args[1:] if op_name(mm) == "einsum" else mm.args[:2]
    if op_name(mm) == "einsum" and len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return [a for a in args if isinstance(a, fx.Node)]


def reach(starts: Iterable[fx.Node], edges) -> set:
    """Every node reachable from ``starts`` (included) along ``edges(node)``."""
    seen, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(edges(n))
    return seen


def descendants(starts: Iterable[fx.Node]) -> set:
    return reach(starts, lambda n: n.users)


def ancestors(start: fx.Node) -> set:
    return reach([start], lambda n: n.all_input_nodes)
