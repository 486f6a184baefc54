"""Small helpers passes share: splice nodes, look up producers, fresh value names."""
from __future__ import annotations

from moec.ir.graph import Graph, Node


def single_use_producer(g: Graph, value: str, op: str) -> Node | None:
    """The node of kind ``op`` defining ``value``, if ``value`` has exactly one use."""
    p = g.producer(value)
    if p is None or p.op != op or g.uses(value) != 1:
        return None
    return p


def swap(g: Graph, replacements: dict[int, list[Node]], outputs=None) -> Graph:
    """Replace node i by ``replacements[i]`` (empty list deletes it), then drop dead nodes."""
    nodes = []
    for i, n in enumerate(g.nodes):
        nodes.extend(replacements.get(i, [n]))
    return g.with_nodes(nodes, outputs).dead_code_eliminated()


def fresh_name(g: Graph, base: str) -> str:
    """A value name not yet used in ``g``."""
    taken = set(g.types)
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name
