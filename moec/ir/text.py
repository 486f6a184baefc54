"""The IR's stable text form, and its parser: print -> parse -> print is the identity.

    graph moe(%x: f16[T, 64], %w_router: f16[8, 64]) {
      %logits: f32[T, 8] = linear(x=%x, w=%w_router)
      %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=8, top_k=2}
      return %ids
    }

Results are printed in the op's declared order, ``_`` standing for an absent optional result.
Attributes equal to the op's default are not printed; values are Python literals, tiles
(``GemmTile(block_m=16, ...)``), or dicts of them (a kernel node's per-bucket
``tiles={16: GemmTile(...), None: GemmTile(...)}``).
"""
from __future__ import annotations

import ast
import re

from .tiles import TILE_TYPES

from .graph import Graph, Node
from .ops import OPS, REQUIRED, IRError
from .types import parse_type, _split_top


def _fmt_value(v) -> str:
    return repr(v)


def print_node(n: Node) -> str:
    opdef = n.opdef
    outs, types = n.outs, dict(zip((r for r, _ in n.results), n.types))
    res = [f"%{outs[r]}: {types[r]}" if r in outs else "_" for r in opdef.results]
    while res and res[-1] == "_":
        res.pop()
    ins = n.ins
    args = ", ".join(f"{r}=%{ins[r]}" for r in opdef.all_operands if r in ins)
    defaults = opdef.attrs
    attrs = n.attr
    shown = [(k, attrs[k]) for k in defaults if k in attrs and (defaults[k] is REQUIRED or attrs[k] != defaults[k])]
    text = f"{', '.join(res)} = {n.op}({args})"
    if shown:
        text += " {" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in shown) + "}"
    return text


def print_graph(g: Graph) -> str:
    params = ", ".join(f"%{name}: {t}" for name, t in g.inputs)
    lines = [f"graph {g.name}({params}) {{"]
    lines += ["  " + print_node(n) for n in g.nodes]
    lines.append("  return " + ", ".join(f"%{v}" for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


_HEAD = re.compile(r"^graph\s+(\w+)\((.*)\)\s*\{$")
_NODE = re.compile(r"^(?P<res>.*?)\s=\s(?P<op>\w+)\((?P<args>.*?)\)(\s*\{(?P<attrs>.*)\})?$")


def _literal(node: ast.AST):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in TILE_TYPES:
        return TILE_TYPES[node.func.id](**{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
    if isinstance(node, ast.Dict) and None not in node.keys:   # (None keys: a ** expansion)
        return {ast.literal_eval(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _parse_attrs(text: str | None) -> dict:
    if not text:
        return {}
    call = ast.parse(f"f({text})", mode="eval").body
    return {kw.arg: _literal(kw.value) for kw in call.keywords}


def parse_node(line: str, lineno: int = 0) -> Node:
    m = _NODE.match(line.strip())
    if not m:
        raise IRError(f"line {lineno}: cannot parse {line!r}")
    op = m.group("op")
    if op not in OPS:
        raise IRError(f"line {lineno}: unknown op {op!r}")
    opdef = OPS[op]
    results, types = [], []
    for role, item in zip(opdef.results, _split_top(m.group("res"))):
        if item == "_":
            continue
        name, _, ty = item.partition(":")
        results.append((role, name.strip().lstrip("%")))
        types.append(parse_type(ty))
    operands = []
    if m.group("args").strip():
        for item in _split_top(m.group("args")):
            role, _, value = item.partition("=")
            operands.append((role.strip(), value.strip().lstrip("%")))
    attrs = _parse_attrs(m.group("attrs"))
    return Node(op, tuple(operands), tuple(results), tuple(types), tuple(attrs.items()))


def parse_graph(text: str) -> Graph:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    head = _HEAD.match(lines[0])
    if not head or lines[-1] != "}" or not lines[-2].startswith("return"):
        raise IRError("expected 'graph name(...) {', nodes, 'return ...', '}'")
    inputs = []
    if head.group(2).strip():
        for item in _split_top(head.group(2)):
            name, _, ty = item.partition(":")
            inputs.append((name.strip().lstrip("%"), parse_type(ty)))
    nodes = tuple(parse_node(ln, i + 2) for i, ln in enumerate(lines[1:-2]))
    ret = lines[-2][len("return"):].strip()
    outputs = tuple(v.strip().lstrip("%") for v in ret.split(",") if v.strip())
    return Graph(head.group(1), tuple(inputs), nodes, outputs)
