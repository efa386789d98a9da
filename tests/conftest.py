"""Every async test runs on both anyio backends (asyncio and trio)."""

from __future__ import annotations

import inspect

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    # Mark coroutine tests before pytest parametrizes them, so the backend becomes one more
    # parameter; marked later, the anyio plugin re-creates the items and drops their parameters.
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
    if collector.istestfunction(obj, name) and inspect.iscoroutinefunction(inner):  # type: ignore[attr-defined]
        pytest.mark.usefixtures("anyio_backend")(obj)
        pytest.mark.anyio(obj)
