"""What the MoBA matcher sees in an fx graph: one normalised op name per node, whatever the spelling
(function, method, operator, module), and the walks it makes through layout ops.

`kind(node)` names what a node computes (``torch.matmul``, ``@`` and ``.bmm`` are all "matmul");
`data_operand(node)` is the tensor a layout op, cast, gather or constant scale passes on, so `chain`
follows one tensor through reshapes, transposes, pads, GQA repeats and dtype casts to where it is
made; `search` looks backwards through a set of op kinds for the first node of another set.
"""
from __future__ import annotations

import builtins
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .moba_trace import resolve_attr

_FN = {torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul",
       torch.einsum: "einsum", torch.functional.einsum: "einsum", torch.mean: "mean", torch.sum: "sum",
       torch.amax: "amax", torch.max: "max", torch.amin: "amin", torch.min: "min", torch.logsumexp: "logsumexp",
       torch.topk: "topk", torch.softmax: "softmax", F.softmax: "softmax", F.scaled_dot_product_attention: "sdpa",
       F.pad: "pad", torch.cat: "cat", torch.concat: "cat", torch.stack: "stack", torch.reshape: "reshape",
       torch.transpose: "transpose", torch.permute: "permute", torch.unsqueeze: "unsqueeze",
       torch.squeeze: "squeeze", torch.flatten: "flatten", torch.repeat_interleave: "repeat_interleave",
       torch.gather: "gather", torch.index_select: "index_select", torch.take_along_dim: "take_along_dim",
       operator.getitem: "getitem", builtins.getattr: "getattr", operator.mul: "mul", torch.mul: "mul",
       operator.truediv: "div", torch.div: "div", F.dropout: "dropout", torch.where: "where",
       torch.masked_fill: "masked_fill", operator.add: "add", torch.add: "add", operator.sub: "sub",
       operator.setitem: "setitem", torch.clone: "clone", torch.tril: "tril"}
_METHOD_ALIAS = {"bmm": "matmul", "mm": "matmul", "__matmul__": "matmul", "swapaxes": "transpose",
                 "concat": "cat", "masked_fill_": "masked_fill", "mul_": "mul", "div_": "div", "add_": "add"}
LAYOUT = {"view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "flatten",
          "unflatten", "expand", "expand_as", "repeat", "repeat_interleave", "pad", "to", "float", "half",
          "bfloat16", "double", "type", "type_as", "clone", "detach", "narrow", "unfold", "getitem", "gather",
          "index_select", "take_along_dim", "getattr"}
CASTS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone", "detach"}
MASKING = {"masked_fill", "where", "add", "sub", "setitem"} | CASTS
REDUCE = {"mean", "sum", "amax", "max", "amin", "min", "logsumexp", "cat", "stack"}
_INPLACE = {"setitem", "masked_fill_", "mul_", "div_", "add_", "sub_", "copy_", "fill_", "scatter_", "zero_"}


def kind(n, root=None) -> Optional[str]:
    """A normalised name for what node ``n`` computes."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function":
        return _FN.get(n.target, getattr(n.target, "__name__", None))
    if n.op == "call_method":
        return _METHOD_ALIAS.get(n.target, n.target)
    if n.op == "call_module" and root is not None:
        m = resolve_attr(root, n.target)
        return "dropout" if isinstance(m, nn.Dropout) else "softmax" if isinstance(m, nn.Softmax) else "module"
    return n.op


def arg(n: fx.Node, pos: int, name: str, default=None):
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor(n) -> bool:
    return isinstance(val(n), torch.Tensor)


def _const_scale(n: fx.Node) -> Optional[fx.Node]:
    """The tensor operand of ``x * c`` / ``x / c`` with a Python number ``c``."""
    if kind(n) in ("mul", "div") and len(n.args) == 2:
        a, b = n.args
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return a
        if kind(n) == "mul" and isinstance(b, fx.Node) and isinstance(a, (int, float)):
            return b
    return None


def data_operand(n: fx.Node) -> Optional[fx.Node]:
    """The tensor a layout op / cast / gather / constant scale passes on (None for other ops)."""
    k = kind(n)
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


def search(start, allowed, want, depth=16) -> Optional[fx.Node]:
    """Backwards from ``start`` through ops in ``allowed``: the first node whose kind is in ``want``."""
    todo, seen = [(start, 0)], set()
    while todo:
        n, d = todo.pop(0)
        if not isinstance(n, fx.Node) or n in seen or d > depth:
            continue
        seen.add(n)
        if kind(n) in want:
            return n
        if kind(n) in allowed or data_operand(n) is not None:
            todo += [(a, d + 1) for a in n.all_input_nodes if is_tensor(a)]
    return None


def operands(mm: fx.Node) -> list[fx.Node]:
    args = mm.args[1:] if kind(mm) == "einsum" else mm.args[:2]
    if kind(mm) == "einsum" and len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return [a for a in args if isinstance(a, fx.Node)]
