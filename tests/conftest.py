"""Every async test runs on both anyio backends (asyncio and trio); tests/soak is marked `soak`.

anyio's pytest plugin runs every coroutine test (``anyio_mode = "auto"`` in pyproject.toml) once
per value of the ``anyio_backend`` fixture below. A test that must run on one backend only says so
with ``@pytest.mark.parametrize("anyio_backend", [...])``; tests/test_backends.py checks that no
other coroutine test is missing a backend.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest

BACKENDS = ("asyncio", "trio")


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--soak-size full` runs the reliability campaign at the size docs/reliability.md reports."""
    parser.addoption(
        "--soak-size",
        choices=("short", "full"),
        default="short",
        help="size of the soak tests: short (CI, the default) or full (the published figures)",
    )


@pytest.fixture(scope="session")
def soak_size(request: pytest.FixtureRequest) -> str:
    """`"short"` or `"full"`: the soak tests scale their counts and durations by it."""
    return str(request.config.getoption("--soak-size"))


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Function-scoped, so each test gets its own event loop and no state leaks between tests."""
    return str(request.param)


@dataclass(frozen=True, slots=True)
class CollectedCoroutineTest:
    """One collected item of a coroutine test, recorded before ``-k`` or ``-m`` deselects any."""

    nodeid: str
    base: tuple[str, tuple[tuple[str, str], ...]]
    backend: str | None
    pinned: bool


_COROUTINE_TESTS = pytest.StashKey[list[CollectedCoroutineTest]]()


def _is_coroutine_test(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    inner = getattr(getattr(function, "hypothesis", None), "inner_test", function)
    return inspect.iscoroutinefunction(inner)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The reliability campaign: everything in tests/soak is marked `soak` (sized by
    # --soak-size). Done here rather than in a tests/soak/conftest.py: a second conftest module
    # would take the name ``conftest`` in sys.modules, and ``from conftest import ...`` (as
    # tests/test_backends.py does) would then import the wrong one.
    for item in items:
        if "tests/soak/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.soak)
    # Recorded before deselection so that ``-k trio`` does not look like a test missing asyncio.
    records = config.stash.setdefault(_COROUTINE_TESTS, [])
    for item in items:
        if not isinstance(item, pytest.Function) or not _is_coroutine_test(item):
            continue
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        # The same parameter objects are shared by both backends' items, so their reprs match.
        others = tuple(sorted((k, repr(v)) for k, v in params.items() if k != "anyio_backend"))
        pinned = any(
            mark.args and mark.args[0] == "anyio_backend"
            for mark in item.iter_markers("parametrize")
        )
        backend = params.get("anyio_backend")
        records.append(
            CollectedCoroutineTest(
                nodeid=item.nodeid,
                base=(f"{item.path}::{item.originalname}", others),
                backend=None if backend is None else str(backend),
                pinned=pinned,
            )
        )


@pytest.fixture
def collected_coroutine_tests(request: pytest.FixtureRequest) -> list[CollectedCoroutineTest]:
    """Every coroutine test item this session collected, with the backend it runs on."""
    return request.config.stash.get(_COROUTINE_TESTS, [])
