"""Every coroutine test runs on asyncio and on trio, unless it pins its backend on purpose."""

from __future__ import annotations

from collections import defaultdict

from conftest import BACKENDS, CollectedCoroutineTest


def test_every_coroutine_test_runs_on_every_backend(
    collected_coroutine_tests: list[CollectedCoroutineTest],
) -> None:
    backends: defaultdict[tuple[str, tuple[tuple[str, str], ...]], list[str | None]]
    backends = defaultdict(list)
    pinned: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for record in collected_coroutine_tests:
        backends[record.base].append(record.backend)
        if record.pinned:
            pinned.add(record.base)
    missing = {
        base[0]: sorted(map(str, found))
        for base, found in backends.items()
        if base not in pinned and sorted(map(str, found)) != sorted(BACKENDS)
    }
    assert not missing, f"coroutine tests not run once on each of {BACKENDS}: {missing}"
    unrun = [r.nodeid for r in collected_coroutine_tests if r.backend not in BACKENDS]
    assert not unrun, f"coroutine tests with no anyio backend: {unrun}"


async def test_this_coroutine_test_is_collected_once_per_backend(
    collected_coroutine_tests: list[CollectedCoroutineTest], anyio_backend: str
) -> None:
    mine = [
        r.backend
        for r in collected_coroutine_tests
        if r.base[0].endswith("::test_this_coroutine_test_is_collected_once_per_backend")
    ]
    assert sorted(map(str, mine)) == sorted(BACKENDS)
    assert anyio_backend in BACKENDS
