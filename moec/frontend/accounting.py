"""Accounting for the whole forward: code the probe never ran keeps a layer eager.

The probe confirms that the recognised computation gives the forward's outputs on the probe's
inputs. Code those inputs never reached is another matter: an input check (``if torch.isnan(h).any():
raise ...``), a branch on the batch (``if h.shape[0] > 100: ...``). Lifted, such code would silently
vanish. So while the frontend runs the module's eager code (screening and probing), `Coverage`
records which lines of the module tree's own Python ran (its classes' methods, not torch's), and which
way each branch went; `unaccounted` then reads the source and names what the kernels would drop:

- an ``if`` / ``while`` at a function's top level (outside loops) that went only one way, unless its
  condition is static: it reads only attributes of ``self`` (incl. ``self.training`` and a weight's
  ``dtype``), constants (``torch.float32``), and arguments compared with None. A static condition is
  covered by the guards (`moec.guards`: the lift is redone when those attributes change) and by the
  probe running both training modes;
- an ``assert`` whose condition is not static (a check of the input the kernels would not make);
- a ``try`` at a function's top level whose handler never ran.

Branches inside loops are the routing and dispatch algorithms themselves (skip an expert with no
tokens, place a pair while capacity lasts); the probe checks their results, and they stay allowed.
Conditional expressions (``a if c else b``) are not tracked (a line runs them whichever way they go).
"""
from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types
from typing import Optional

from torch import nn


def _user_code(module: nn.Module) -> dict:
    """``{code object: function}`` of the methods of the module tree's classes outside torch."""
    found: dict = {}
    seen_classes = set()
    for m in module.modules():
        for cls in type(m).__mro__:
            if cls in seen_classes or cls is object or (cls.__module__ or "").startswith("torch."):
                continue
            seen_classes.add(cls)
            for value in vars(cls).values():
                fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if isinstance(fn, types.FunctionType) and not getattr(fn, "__module__", "").startswith("moec"):
                    found[fn.__code__] = fn
    return found


class Coverage:
    """Inside ``with Coverage(module) as cov:``, the lines (and line-to-line arcs) of the module tree's
    own methods that run are recorded (`sys.settrace`, only in those functions' frames)."""

    def __init__(self, module: nn.Module):
        self.functions = _user_code(module)
        self.arcs: dict = {code: set() for code in self.functions}
        self.lines: dict = {code: set() for code in self.functions}

    def _global(self, frame, event, arg):
        if event != "call" or frame.f_code not in self.arcs:
            return None
        arcs, lines = self.arcs[frame.f_code], self.lines[frame.f_code]
        last = [frame.f_lineno]

        def local(frame, event, arg):
            if event == "line":
                arcs.add((last[0], frame.f_lineno))
                lines.add(frame.f_lineno)
                last[0] = frame.f_lineno
            elif event == "return":
                arcs.add((last[0], -1))
            return local
        return local

    def __enter__(self) -> "Coverage":
        self._old = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self._old)


def _static(expr: ast.AST, params: set) -> bool:
    """Whether a condition reads only ``self``'s attributes, constants, and arguments tested against None."""
    if isinstance(expr, ast.Constant):
        return True
    if isinstance(expr, ast.Attribute):
        root = expr
        while isinstance(root, ast.Attribute):
            root = root.value
        # (an attribute of torch is a constant: torch.float32; a weight's dtype is guarded, `moec.guards`)
        return isinstance(root, ast.Name) and root.id in ("self", "torch")
    if isinstance(expr, ast.BoolOp):
        return all(_static(v, params) for v in expr.values)
    if isinstance(expr, ast.UnaryOp):
        return _static(expr.operand, params)
    if isinstance(expr, ast.Compare):
        if (len(expr.ops) == 1 and isinstance(expr.ops[0], (ast.Is, ast.IsNot)) and isinstance(expr.left, ast.Name)
                and expr.left.id in params and isinstance(expr.comparators[0], ast.Constant)
                and expr.comparators[0].value is None):
            return True
        return _static(expr.left, params) and all(_static(c, params) for c in expr.comparators)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and \
            expr.func.id in ("isinstance", "len", "getattr", "hasattr", "callable"):
        return all(_static(a, params) or isinstance(a, ast.Name) and a.id in dir(__builtins__) for a in expr.args)
    if isinstance(expr, ast.Subscript):
        return _static(expr.value, params) and _static(expr.slice, params)
    return False


def _source(fn) -> Optional[tuple[ast.FunctionDef, int]]:
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    node = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    return (node, start - 1) if node is not None else None


def _where(fn, line: int) -> str:
    code = inspect.getsourcelines(fn)[0]
    first = fn.__code__.co_firstlineno
    text = code[line - first].strip() if 0 <= line - first < len(code) else ""
    return f"{fn.__qualname__} ({fn.__code__.co_filename.rsplit('/', 1)[-1]}:{line}: {text})"


def unaccounted(cov: Coverage) -> Optional[str]:
    """What the probe never ran that the kernels would drop (see the module docstring), or None."""
    for code, fn in cov.functions.items():
        lines = cov.lines[code]
        if not lines:
            continue                                    # never called: its callers' branches decide
        got = _source(fn)
        if got is None:
            continue
        node, offset = got
        params = {a.arg for a in node.args.args + node.args.kwonlyargs} - {"self"}
        arcs = cov.arcs[code]
        why = _walk(node.body, offset, params, lines, arcs, fn, depth=0)
        if why:
            return why
    return None


def _walk(body: list, offset: int, params: set, lines: set, arcs: set, fn, depth: int) -> Optional[str]:
    for stmt in body:
        line = stmt.lineno + offset
        if isinstance(stmt, ast.Assert) and line in lines and not _static(stmt.test, params):
            return f"an input check the kernels would not make: {_where(fn, line)}"
        if isinstance(stmt, (ast.If, ast.While)) and depth == 0 and line in lines and not _static(stmt.test, params):
            first = stmt.body[0].lineno + offset
            into = (line, first) in arcs
            past = any(a == line and b != first for a, b in arcs)
            if not (into and past):
                way = "took" if not into else "skipped"
                return (f"a branch the probe's inputs never {way}, on data, not on attributes: {_where(fn, line)}")
        if isinstance(stmt, ast.Try) and depth == 0 and line in lines:
            for handler in stmt.handlers:
                if handler.body and handler.body[0].lineno + offset not in lines:
                    return f"an exception handler the probe's inputs never reached: {_where(fn, handler.lineno + offset)}"
        inner = depth + isinstance(stmt, (ast.For, ast.While, ast.AsyncFor))
        for field in ("body", "orelse", "finalbody"):
            sub = getattr(stmt, field, None)
            if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                why = _walk(sub, offset, params, lines, arcs, fn, inner)
                if why:
                    return why
        for handler in getattr(stmt, "handlers", []):
            why = _walk(handler.body, offset, params, lines, arcs, fn, inner)
            if why:
                return why
    return None
