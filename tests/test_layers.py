"""The package's folders are its layers: a module imports only from its own layer or the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# bottom to top; "cli" is the modules directly in potion/ (the command-line layer)
LAYERS = ("core", "config", "data", "models", "evaluation", "unlearning", "tracking", "reporting", "pipelines",
          "sweep", "cli")


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "cli"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every potion module a file imports, at module level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("potion."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("potion") and not node.level:
            names.update(f"{node.module}.{a.name}" if node.module == "potion" else node.module for a in node.names)
    return names


def violations() -> list[str]:
    found = []
    for path in sorted((ROOT / "potion").rglob("*.py")):
        here = module_name(path)
        for target in imported(path):
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(here)):
                found.append(f"{here} ({layer_of(here)}) imports {target} ({layer_of(target)})")
    return found


def test_every_import_points_down_the_layers() -> None:
    assert violations() == []


@pytest.mark.parametrize("module, layer", [("potion.core.io", "core"), ("potion.sweep.driver", "sweep"),
                                           ("potion.heal", "cli"), ("potion.data.triggers.base", "data")])
def test_layer_of_names_the_folder(module: str, layer: str) -> None:
    assert layer_of(module) == layer


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from potion.pipelines.train import run_training\n")
    assert imported(bad) == {"potion.pipelines.train"}
    assert LAYERS.index(layer_of("potion.pipelines.train")) > LAYERS.index(layer_of("potion.core.io"))
