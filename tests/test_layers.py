"""The packages import only downward; no two packages and no two modules import each other.

Every module of ``organixmd`` and ``organixctl`` is parsed (not imported) with
:mod:`ast`; each import of an organixm module, at any depth (function-local and
``TYPE_CHECKING`` imports too), is an edge from the importing module's layer to the
imported module's layer. ``ALLOWED`` is the layering drawn in docs/architecture.md:
a layer may import itself and the layers listed for it, nothing else.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: The daemon's layers, bottom to top: each may import every layer below it.
#: ``organixmd`` is the package root (its ``__version__`` only); ``organixmd.apidef``
#: is the control API's definition (the standard library only), shared by every layer
#: and by organixctl's daemon commands.
DAEMON_LAYERS = (
    "organixmd",
    "organixmd.apidef",
    "organixmd.base",
    "organixmd.release",
    "organixmd.boot",
    "organixmd.install",
    "organixmd.host",
    "organixmd.service",
    # The daemon's command line: the top of organixmd.
    "organixmd.cli",
)


def _below(layer: str) -> frozenset[str]:
    return frozenset(DAEMON_LAYERS[: DAEMON_LAYERS.index(layer)])


ALLOWED: dict[str, frozenset[str]] = {
    **{layer: _below(layer) for layer in DAEMON_LAYERS},
    # Making a release needs what a release is and how GRUB is driven, never a host.
    "organixctl.publisher": _below("organixmd.install"),
    "organixctl.provisioner": _below("organixmd.host"),
    # The commands: never the daemon's host or service layers.
    "organixctl": _below("organixmd.host") | {"organixctl.publisher", "organixctl.provisioner"},
}

ROOTS = ("organixmd", "organixctl")


def layer_of(module: str) -> str:
    """The longest ``ALLOWED`` name that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in ALLOWED:
            return candidate
    raise AssertionError(f"{module} belongs to no layer; add its package to ALLOWED")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every organixm import in ``tree``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            # ``from organixmd.boot import grubenv`` imports the module organixmd.boot.grubenv.
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def import_edges(root: Path = REPO) -> list[tuple[str, int, str, str]]:
    """(importing module, line, imported module, its layer) for every organixm import."""
    edges = []
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            module = module_name(path, root)
            tree = ast.parse(path.read_text(), str(path))
            for line, target in imported(tree, module, path.name == "__init__.py"):
                if target.split(".")[0] not in ROOTS:
                    continue
                edges.append((module, line, target, layer_of(target)))
    return edges


def violations(edges: list[tuple[str, int, str, str]]) -> list[str]:
    """One line per offending import statement."""
    found = []
    seen: set[tuple[str, int]] = set()
    for module, line, target, target_layer in edges:
        layer = layer_of(module)
        if target_layer != layer and target_layer not in ALLOWED[layer]:
            if (module, line) in seen:
                continue
            seen.add((module, line))
            found.append(
                f"{module}:{line} imports {target} ({layer} may not import {target_layer})"
            )
    return found


def package_cycles(edges: list[tuple[str, int, str, str]]) -> list[list[str]]:
    """Cycles in the graph of layers (packages) that the imports draw."""
    graph: dict[str, set[str]] = {layer: set() for layer in ALLOWED}
    for module, _, _, target_layer in edges:
        if layer_of(module) != target_layer:
            graph[layer_of(module)].add(target_layer)
    return cycles_in(graph)


def module_cycles(edges: list[tuple[str, int, str, str]]) -> list[list[str]]:
    """Cycles between modules (``TYPE_CHECKING`` and function-local imports count)."""
    modules = {module for module, _, _, _ in edges}
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, _, target, _ in edges:
        if target in modules and target != module:
            graph[module].add(target)
    return cycles_in(graph)


def cycles_in(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_every_module_belongs_to_a_layer() -> None:
    for top in ROOTS:
        for path in (REPO / top).rglob("*.py"):
            layer_of(module_name(path))


def test_layers_import_only_downward() -> None:
    edges = import_edges()
    assert len(edges) > 100, "the scan found almost no imports; is it reading the packages?"
    assert violations(edges) == []


def test_no_cycles_between_packages() -> None:
    assert package_cycles(import_edges()) == []


def test_no_cycles_between_modules() -> None:
    assert module_cycles(import_edges()) == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """A planted import of the service layer from the boot layer is reported, with the
    cycle it closes (service imports boot)."""
    for top in ROOTS:
        for path in (REPO / top).rglob("*.py"):
            copy = tmp_path / path.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    planted = tmp_path / "organixmd" / "boot" / "port.py"
    planted.write_text(planted.read_text() + "\nfrom organixmd.service.daemon import Daemon\n")
    edges = import_edges(tmp_path)
    found = violations(edges)
    assert len(found) == 1
    assert found[0].startswith("organixmd.boot.port:")
    assert "organixmd.boot may not import organixmd.service" in found[0]
    cycles = package_cycles(edges)
    assert any({"organixmd.boot", "organixmd.service"} <= set(cycle) for cycle in cycles), cycles
    assert any("organixmd.boot.port" in cycle for cycle in module_cycles(edges))


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("organixmd.boot.grubenv", "organixmd.boot"),
        ("organixmd.cli", "organixmd.cli"),
        ("organixctl.cmd_status", "organixctl"),
        ("organixctl.publisher.publish", "organixctl.publisher"),
    ],
)
def test_layer_of(module: str, layer: str) -> None:
    assert layer_of(module) == layer
