"""The layers of shared/ARCHITECTURE.md point inward, and no module grows long without a reason.

The imports of every module under src/resilient_voice are read statically (``ast``), at module
level, under ``if TYPE_CHECKING:`` and inside functions, and checked against the layer map below:

- foundations (the clock, validation, errors, events, failure kinds, correlation, small private
  helpers) import no primitive;
- primitives (``breaker``, ``limiter``, ``retry``) import no composition and no adapter;
- composition (``policy``) imports no adapter;
- adapters may import inward (and each other, without cycles);
- the root package (``resilient_voice``) imports the core only: an adapter name it re-exports
  (``ResilientTransport``) is served lazily and imported for type checkers only.

Every module must be placed in :data:`LAYERS`: a new top-level module or package fails
:func:`test_every_module_is_placed` until it is. There is no cycle between modules through their
module-level imports; the function-level (lazy) imports that cross a package boundary are pinned
in :data:`LAZY_IMPORTS` with their reason. No module imports an underscore name from another
top-level module or package: what two of them share lives in a private module under a plain name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "resilient_voice"

FOUNDATION, PRIMITIVE, COMPOSITION, ADAPTER = 0, 1, 2, 3
ROOT = "resilient_voice"

# Every top-level module or package of resilient_voice and its layer; a package's modules take
# its layer (imports inside one package are free, but must not form a cycle).
LAYERS: dict[str, int] = {
    "resilient_voice._callables": FOUNDATION,
    "resilient_voice._clock": FOUNDATION,
    "resilient_voice._correlation_id": FOUNDATION,
    "resilient_voice._exports": FOUNDATION,
    "resilient_voice._lease_params": FOUNDATION,
    "resilient_voice._loops": FOUNDATION,
    "resilient_voice._pickling": FOUNDATION,
    "resilient_voice._request_checks": FOUNDATION,
    "resilient_voice._store_watch": FOUNDATION,
    "resilient_voice._urls": FOUNDATION,
    "resilient_voice._validate": FOUNDATION,
    "resilient_voice._version": FOUNDATION,
    "resilient_voice.correlation": FOUNDATION,
    "resilient_voice.errors": FOUNDATION,
    "resilient_voice.events": FOUNDATION,
    "resilient_voice.failure": FOUNDATION,
    "resilient_voice.breaker": PRIMITIVE,
    "resilient_voice.leases": PRIMITIVE,
    "resilient_voice.limiter": PRIMITIVE,
    "resilient_voice.retry": PRIMITIVE,
    "resilient_voice.policy": COMPOSITION,
    "resilient_voice.http": ADAPTER,
    "resilient_voice._provider": ADAPTER,
    "resilient_voice._prometheus": ADAPTER,  # imports prometheus-client
    "resilient_voice.twilio": ADAPTER,
    "resilient_voice.vapi": ADAPTER,
    "resilient_voice.asgi": ADAPTER,
    "resilient_voice.metrics": ADAPTER,
    "resilient_voice.otel": ADAPTER,
    "resilient_voice.redis": ADAPTER,
    "resilient_voice.testing": ADAPTER,
    "resilient_voice.cli": ADAPTER,
    "resilient_voice._demo": ADAPTER,
    "resilient_voice._demo_view": ADAPTER,
    "resilient_voice._demo_campaign": ADAPTER,
    "resilient_voice._demo_faults": ADAPTER,
    "resilient_voice._demo_fleet": ADAPTER,
    "resilient_voice.__main__": ADAPTER,
}

# What the root package may import for type checkers only (names it serves lazily).
ROOT_TYPE_ONLY = {"resilient_voice.http"}

# Function-level imports that cross a top-level boundary, (importer, imported): each is lazy on
# purpose. A new one must be added here with its reason.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("resilient_voice.cli", "resilient_voice._demo"): "`--help` answers without the web stack",
    ("resilient_voice._demo", "resilient_voice.asgi"): "prometheus-client, when metrics are on",
    ("resilient_voice._demo", "resilient_voice.metrics"): "prometheus-client, when metrics are on",
    ("resilient_voice._demo", "resilient_voice.testing"): "the fake and uvicorn, when it runs",
    ("resilient_voice._demo", "resilient_voice._demo_fleet"): "only with --workers",
    ("resilient_voice._demo_fleet", "resilient_voice._demo"): "the report's helpers, at run time",
    ("resilient_voice._demo_fleet", "resilient_voice.redis"): "coredis, in a worker process",
    (
        "resilient_voice._demo_campaign",
        "resilient_voice.twilio",
    ): "httpx and pydantic, when it runs",
    ("resilient_voice._demo_campaign", "resilient_voice.vapi"): "httpx and pydantic, when it runs",
    (
        "resilient_voice._demo_faults",
        "resilient_voice.testing._fake_http",
    ): "the fake, when it runs",
    ("resilient_voice._demo_faults", "resilient_voice.testing._fake_twilio"): "its error bodies",
    ("resilient_voice._demo_faults", "resilient_voice.testing._fake_vapi"): "its error bodies",
    ("resilient_voice._demo_faults", "resilient_voice.testing._serve"): "uvicorn, when it runs",
    ("resilient_voice.cli", "resilient_voice._demo_faults"): "`--help` names the fault profiles",
}

LONG = 400
LONG_MARKER = "Over 400 lines:"
# Modules over LONG lines whose docstring gives no reason yet: split them or write the reason
# (a docstring paragraph starting with LONG_MARKER), then drop them from here.
LONG_WITHOUT_REASON: set[str] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    lazy: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _source(module: str, node: ast.ImportFrom) -> str:
    """The module ``node`` imports from, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules of this package that ``node`` imports (``from pkg import sub`` gives sub)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in MODULES)
        return
    source = _source(module, node)
    if source not in MODULES:
        return
    names = [f"{source}.{alias.name}" for alias in node.names]
    yield from (name for name in names if name in MODULES)
    if any(name not in MODULES for name in names):
        yield source


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> Iterator[Import]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))

    def walk(node: ast.AST, lazy: bool, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(module, child):
                    yield Import(module, target, lazy, type_only, child.lineno)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), lazy, True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), lazy, type_only)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, True, type_only)
            else:
                yield from walk(child, lazy, type_only)

    yield from walk(tree, False, False)


IMPORTS: list[Import] = [imp for module in MODULES for imp in _imports(module)]


def _unit(module: str) -> str:
    """The top-level module or package that ``module`` belongs to (its entry in LAYERS)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _layer(module: str) -> int:
    return LAYERS[_unit(module)]


def test_every_module_is_placed() -> None:
    unplaced = sorted({_unit(m) for m in MODULES if m != ROOT} - set(LAYERS))
    assert unplaced == [], f"place these in LAYERS (tests/test_layering.py): {unplaced}"


def test_the_walk_sees_the_imports() -> None:
    """A guard against a walk that finds nothing and so passes vacuously."""
    pairs = {(i.importer, i.imported) for i in IMPORTS}
    assert ("resilient_voice.policy", "resilient_voice.breaker") in pairs
    assert ("resilient_voice.breaker._facade", "resilient_voice._clock") in pairs
    assert any(i.lazy for i in IMPORTS)
    assert any(i.type_only for i in IMPORTS)


def test_layers_point_inward() -> None:
    upward = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if i.importer != ROOT
        and _unit(i.importer) != _unit(i.imported)
        and i.imported != ROOT
        and _layer(i.imported) > _layer(i.importer)
    ]
    assert upward == []


def test_nothing_imports_the_root_package() -> None:
    """The root re-exports the core; a module importing it would depend on everything."""
    assert [f"{i.importer}:{i.line}" for i in IMPORTS if i.imported == ROOT] == []


def test_the_root_imports_the_core_only() -> None:
    wrong = [
        f"{i.imported}:{i.line}"
        for i in IMPORTS
        if i.importer == ROOT
        and _layer(i.imported) > COMPOSITION
        and not (i.type_only and _unit(i.imported) in ROOT_TYPE_ONLY)
    ]
    assert wrong == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _is_parent(package: str, module: str) -> bool:
    return module.startswith(f"{package}.")


def test_no_import_cycles() -> None:
    """Module-level imports (not lazy, not type-only) form no cycle.

    A package's ``__init__`` importing its own submodules is the re-export, not a dependency of
    theirs, so a submodule importing a sibling through the package (``from pkg import _x``) is
    counted as importing the sibling, and the package -> own submodule edges are left out.
    """
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.lazy or i.type_only or i.importer == i.imported:
            continue
        if _is_parent(i.importer, i.imported):
            continue
        edges.setdefault(i.importer, set()).add(i.imported)
    assert _cycles(edges) == []


def test_lazy_imports_across_packages_are_pinned() -> None:
    found = {
        (_unit(i.importer) if i.importer != ROOT else ROOT, i.imported)
        for i in IMPORTS
        if i.lazy and not i.type_only and _unit(i.importer) != _unit(i.imported)
    }
    assert found == set(LAZY_IMPORTS)


def _private_names_imported_across_units() -> Iterator[str]:
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _source(module, node)
            if source not in MODULES or _unit(source) == _unit(module):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{source}.{alias.name}" not in MODULES:
                    yield f"{module}:{node.lineno} imports {source}.{alias.name}"


def test_no_private_name_is_imported_across_packages() -> None:
    """An underscore name is its module's (or package's) own: nothing outside imports it.

    What two packages share gets a home both import, under a name without an underscore, in a
    private module (``_pickling``, ``_prometheus``, ``_correlation_id``). Private *modules*
    (``http._retry_after``) may be imported from anywhere: the underscore there marks them as
    no part of the public surface, not as one package's secret.
    """
    assert list(_private_names_imported_across_units()) == []


def _docstring(module: str) -> str:
    tree = ast.parse(MODULES[module].read_text())
    return ast.get_docstring(tree) or ""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    reasoned = LONG_MARKER in _docstring(module)
    if module in LONG_WITHOUT_REASON:
        # The entry goes once the module is split or its reason written.
        assert lines > LONG, f"{module}: drop it from LONG_WITHOUT_REASON"
        assert not reasoned, f"{module}: drop it from LONG_WITHOUT_REASON"
    elif lines > LONG:
        assert reasoned, f"{module} has {lines} lines: split it, or say why ({LONG_MARKER!r})"
