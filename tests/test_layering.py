"""Imports run downward only: every installed package imports only the layers below it.

Bottom to top: the contract (``pipeline.schema``, ``pipeline.settings``) < ``lake`` (storage)
< ``pipeline`` (the core) < ``generator``, ``queries`` < ``jobs`` < ``api`` < ``cli``, which
wires the product and which nothing imports. Every import counts: at module level, inside a
function (a lazy import is still a dependency) and under ``TYPE_CHECKING``. ``bench/``,
``fuzz/`` and ``tests/`` sit outside and may import anything.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The contract: what every layer agrees on; it imports nothing from the project.
CONTRACT: Final = frozenset({"pipeline.schema", "pipeline.settings"})

#: Layer → the layers it may import (itself included). ``contract`` is the two modules above;
#: ``pipeline`` is the rest of the ``pipeline`` package.
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "contract": frozenset({"contract"}),
    "lake": frozenset({"contract", "lake"}),
    "pipeline": frozenset({"contract", "lake", "pipeline"}),
    "generator": frozenset({"contract", "pipeline", "generator"}),
    "queries": frozenset({"contract", "lake", "pipeline", "queries"}),
    "jobs": frozenset({"contract", "lake", "pipeline", "queries", "jobs"}),
    "api": frozenset({"contract", "lake", "pipeline", "queries", "api"}),
    "cli": frozenset(
        {"contract", "lake", "pipeline", "generator", "queries", "jobs", "api", "cli"}
    ),
}
PACKAGES: Final = frozenset(ALLOWED) - {"contract"}


def layer(module: str) -> str | None:
    """The layer ``module`` belongs to; None for anything outside the project."""
    if module in CONTRACT or any(module.startswith(m + ".") for m in CONTRACT):
        return "contract"
    top = module.partition(".")[0]
    return top if top in PACKAGES else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path = ROOT) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``path``; ``from p import m`` names ``p.m`` when m
    is a module (``from pipeline import schema`` is an import of the contract)."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if is_module(full, root) else base


def installed_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {name.partition(".")[0] for name in include}


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        own = layer(module_name(path))
        assert own is not None
        for line, target in imported(path):
            theirs = layer(target)
            if theirs is not None and theirs not in ALLOWED[own]:
                where = path.relative_to(ROOT)
                found.append(f"{where}:{line}: {own} imports {target} ({theirs})")
    return found


def test_every_installed_package_has_a_layer() -> None:
    assert installed_packages() == set(PACKAGES)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_run_downward(package: str) -> None:
    found = violations(package)
    assert not found, "imports that run upward:\n" + "\n".join(found)


def test_the_check_sees_lazy_relative_and_type_only_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import command\n"
        "if TYPE_CHECKING:\n"
        "    from api.app import create_app\n"
        "def f():\n"
        "    import cli\n"
        "    from pipeline import schema\n"
    )
    for name in ("generator/__init__.py", "generator/command.py", "pipeline/schema.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    path = tmp_path / "generator" / "probe.py"
    path.write_text(source)
    found = sorted(module for _, module in imported(path, tmp_path))
    assert found == ["api.app", "cli", "generator.command", "pipeline.schema", "typing"]
    assert [layer(m) for m in ("pipeline.schema", "pipeline.spool", "cli", "numpy")] == [
        "contract",
        "pipeline",
        "cli",
        None,
    ]
