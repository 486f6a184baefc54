"""Imports run one way. Every import of the package is read from the source (at module level and
inside functions, relative ones resolved; ``passes/``, ``runtime/`` and ``templates/`` read as
``moec.passes``, ``moec.runtime``, ``moec.templates``, as installed), and

- no module may import one of a higher layer, nor the frontend the runtime or back;
- there is no import cycle at all.

The layers, bottom up (docs/architecture.md draws them):

    semantics   moec.spec, moec.reference, moec.moba (the definitions), moec.templates (data),
                moec.env (environment variables), moec.log (the moec loggers)
    ir          moec.ir: ops, types, tiles, graph, text, verifier, interpreter, graph builders
    frontend    moec.frontend: eager modules -> specs            | runtime   moec.runtime: kernels,
                                                                 |           programs, cache, launch
    passes      moec.passes: IR -> IR, tiling, lowering to a Program
    driver      moec.compiler: recipe -> IR -> passes -> Program (the one place IR becomes kernels)
    top         regions, ops, hf, autotune, explain, api, the package itself
"""
import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"moec": "moec", "passes": "moec.passes", "runtime": "moec.runtime", "templates": "moec.templates"}

LAYERS = {
    "semantics": ("moec.spec", "moec.reference", "moec.moba", "moec.templates", "moec.env",
                  "moec.log"),
    "ir": ("moec.ir",),
    "frontend": ("moec.frontend",),
    "runtime": ("moec.runtime",),
    "passes": ("moec.passes",),
    "driver": ("moec.compiler",),
    "top": ("moec.region", "moec.regions", "moec.ops", "moec.hf", "moec.autotune", "moec.explain", "moec.api",
            "moec"),
}
RANK = {"semantics": 0, "ir": 1, "frontend": 2, "runtime": 2, "passes": 3, "driver": 4, "top": 5}


def modules() -> dict:
    """``{module name: path}`` of every Python module of the package."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def layer_of(module: str) -> str:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def imports(name: str, path: Path, known: dict) -> set:
    """The package modules ``name`` imports anywhere in its source, with the packages whose
``__init__`` that runs (a subpackage's, not the root's: ``moec/__init__.py`` is the public face)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        if target and target != name:
            found.add(target)
            # Python runs the __init__ of every package on the way (but the root's, and our own)
            parts = target.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in known and not (name + ".").startswith(pkg + "."):
                    found.add(pkg)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("moec"):
                continue
            for a in node.names:          # `from pkg import submodule` imports the submodule
                add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return found


def graph() -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    for name, path in known.items():
        g.add_node(name)
        for target in imports(name, path, known):
            g.add_edge(name, target)
    return g


def test_the_reader_sees_imports():
    g = graph()
    assert ("moec.passes.pipeline", "moec.ir.verify") in g.edges
    assert len(g) > 60


def test_no_upward_imports():
    bad = []
    for a, b in graph().edges:
        la, lb = layer_of(a), layer_of(b)
        if RANK[lb] > RANK[la] or (RANK[la] == RANK[lb] and la != lb):
            bad.append(f"{a} ({la}) imports {b} ({lb})")
    assert not bad, "imports that point up or across:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    g.remove_node("moec")          # the package's public face imports its API; nothing imports it back
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_has_modules(layer):
    assert any(layer_of(m) == layer for m in modules())
