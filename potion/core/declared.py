"""What a package's modules declare with a decorator, read from their source without importing them.

Methods and attacks register themselves with a decorator (``@register("potion", heal_ok=True)``,
``@trigger_kind("sig", ...)``) in modules that import torch. The config check runs before torch is imported,
so it reads the same declarations here: the decorator's literal arguments and the decorated function's
parameters or class's fields. One declaration, read two ways; nothing is written twice.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Declared:
    """One ``@decorator("name", key=value, ...)`` on a function or class."""

    name: str
    module: str  # dotted name of the declaring module
    options: dict[str, Any]  # the decorator's keyword arguments
    # a function's parameters after the first, or a class's annotated fields: (name, annotation, default) source
    fields: tuple[tuple[str, str, str | None], ...]


def declared(package: str, decorator: str) -> dict[str, Declared]:
    """Every ``@decorator(...)`` in the modules directly inside ``package`` (its ``__path__`` folders)."""
    module = sys.modules.get(package)
    spec = None if module is not None else importlib.util.find_spec(package)
    folders = module.__path__ if module is not None else spec.submodule_search_locations  # type: ignore[union-attr]
    out: dict[str, Declared] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.py")):
            for item in _read(path, f"{package}.{path.stem}", decorator, path.stat().st_mtime_ns):
                out.setdefault(item.name, item)
    return out


@cache
def _read(path: Path, module: str, decorator: str, _mtime: int) -> tuple[Declared, ...]:
    found = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef | ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == decorator and deco.args:
                options = {k.arg: ast.literal_eval(k.value) for k in deco.keywords if k.arg}
                found.append(Declared(ast.literal_eval(deco.args[0]), module, options, _fields(node)))
    return tuple(found)


def _fields(node: ast.FunctionDef | ast.ClassDef) -> tuple[tuple[str, str, str | None], ...]:
    def src(n: ast.AST | None) -> str | None:
        return None if n is None else ast.unparse(n)

    if isinstance(node, ast.ClassDef):
        return tuple((n.target.id, ast.unparse(n.annotation), src(n.value)) for n in node.body
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = list(zip(positional, defaults, strict=True))[1:] + list(zip(a.kwonlyargs, a.kw_defaults, strict=True))
    return tuple((p.arg, src(p.annotation) or "Any", src(d)) for p, d in params)
