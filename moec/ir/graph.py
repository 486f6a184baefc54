"""The IR graph: frozen nodes in topological order, with a networkx view for analyses.

A `Graph` is immutable; passes build new graphs (`Graph.with_nodes`, `Builder`). Values are
named strings (``%x`` in text); each is defined once, by a graph input or a node result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import networkx as nx

from .ops import OPS, REQUIRED, IRError
from .types import TensorType


@dataclass(frozen=True)
class Node:
    """One op application. ``results``/``operands`` are (role, value name) pairs; absent optional
    results are simply not listed. ``types`` gives each result value's type."""

    op: str
    operands: tuple[tuple[str, str], ...]
    results: tuple[tuple[str, str], ...]
    types: tuple[TensorType, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    @property
    def opdef(self):
        return OPS[self.op]

    @property
    def ins(self) -> dict[str, str]:
        return dict(self.operands)

    @property
    def outs(self) -> dict[str, str]:
        return dict(self.results)

    @property
    def attr(self) -> dict[str, Any]:
        full = {k: v for k, v in self.opdef.attrs.items() if v is not REQUIRED}
        full.update(self.attrs)
        return full

    @property
    def result_types(self) -> dict[str, TensorType]:
        return {name: t for (_, name), t in zip(self.results, self.types)}

    @property
    def name(self) -> str:
        """The node's first result value: how passes and kernel headers refer to it."""
        return self.results[0][1]

    def replace(self, operands=None, attrs=None, results=None, types=None) -> "Node":
        """A copy with operands and attrs *updated* (None values delete an entry)."""
        ops = dict(self.operands)
        ops.update(operands or {})
        at = dict(self.attrs)
        at.update(attrs or {})
        return Node(self.op, tuple((k, v) for k, v in ops.items() if v is not None),
                    results if results is not None else self.results,
                    types if types is not None else self.types,
                    tuple((k, v) for k, v in at.items()))


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[tuple[str, TensorType], ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]

    @property
    def types(self) -> dict[str, TensorType]:
        types = dict(self.inputs)
        for n in self.nodes:
            types.update(n.result_types)
        return types

    def producer(self, value: str) -> Node | None:
        for n in self.nodes:
            if value in n.outs.values():
                return n
        return None

    def users(self, value: str) -> list[Node]:
        return [n for n in self.nodes if value in n.ins.values()]

    def uses(self, value: str) -> int:
        """How often ``value`` is read: every operand slot that names it, and every output."""
        return sum(list(n.ins.values()).count(value) for n in self.nodes) + self.outputs.count(value)

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def with_nodes(self, nodes: Iterable[Node], outputs: Iterable[str] | None = None) -> "Graph":
        return Graph(self.name, self.inputs, tuple(nodes),
                     tuple(outputs) if outputs is not None else self.outputs)

    def nx(self) -> nx.DiGraph:
        """Def-use graph over node indices (edge i -> j: node j reads a result of node i)."""
        g = nx.DiGraph()
        defs = {}
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op)
            for v in n.ins.values():
                if v in defs:
                    g.add_edge(defs[v], i, value=v)
            for v in n.outs.values():
                defs[v] = i
        return g

    def dead_code_eliminated(self) -> "Graph":
        """Drop nodes none of whose results reach an output."""
        live = set(self.outputs)
        kept = []
        for n in reversed(self.nodes):
            if any(v in live for v in n.outs.values()):
                kept.append(n)
                live.update(n.ins.values())
        return self.with_nodes(reversed(kept))


class Builder:
    """Appends nodes with inferred result types; used by the frontend and by passes."""

    def __init__(self, name: str, inputs: Iterable[tuple[str, TensorType]] = ()):
        self.name = name
        self.inputs = list(inputs)
        self.nodes: list[Node] = []
        self.types = dict(self.inputs)
        self._names: set[str] = set(self.types)

    def input(self, name: str, type_: TensorType) -> str:
        self.inputs.append((name, type_))
        self.types[name] = type_
        self._names.add(name)
        return name

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}{i}"
        self._names.add(name)
        return name

    def add(self, op: str, operands: dict[str, str | None], attrs: dict | None = None,
            names: dict[str, str] | None = None, results: Iterable[str] | None = None) -> dict[str, str]:
        """Append ``op``; returns role -> value name for the results it defines.

        ``results`` selects which roles to define (default: all non-optional ones);
        ``names`` suggests value names per role.
        """
        opdef = OPS[op]
        operands = {k: v for k, v in operands.items() if v is not None}
        attrs = dict(attrs or {})
        full_attrs = {k: v for k, v in opdef.attrs.items() if v is not REQUIRED}
        full_attrs.update(attrs)
        inferred = opdef.infer({r: self.types[v] for r, v in operands.items()}, full_attrs)
        roles = list(results) if results is not None else [
            r for r in opdef.results if r not in opdef.optional_results]
        for r in roles:
            if r not in opdef.results:
                raise IRError(f"{op} has no result {r!r}")
        roles = [r for r in opdef.results if r in roles]
        outs = tuple((r, self.fresh((names or {}).get(r, r))) for r in roles)
        types = tuple(inferred[r] for r, _ in outs)
        node = Node(op, tuple(operands.items()), outs, types, tuple(attrs.items()))
        self.nodes.append(node)
        self.types.update(node.result_types)
        return dict(outs)

    def graph(self, outputs: Iterable[str]) -> Graph:
        return Graph(self.name, tuple(self.inputs), tuple(self.nodes), tuple(outputs))
