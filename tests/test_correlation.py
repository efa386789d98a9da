from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from resilient_voice.correlation import (
    DEFAULT_CORRELATION_ID_VALIDATOR,
    CorrelationIdFilter,
    CorrelationIdValidator,
    add_correlation_id,
    correlation_scope,
    get_correlation_id,
    is_valid_correlation_id,
    new_attempt_id,
    new_correlation_id,
    validate_correlation_id,
)

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_generated_ids_are_32_lowercase_hex_and_unique() -> None:
    ids = [new_correlation_id() for _ in range(5000)] + [new_attempt_id() for _ in range(5000)]
    assert all(HEX32.fullmatch(value) for value in ids)
    assert len(set(ids)) == len(ids)
    assert all(is_valid_correlation_id(value) for value in ids[:10])


FORK_CHECK = """
import os, sys
from resilient_voice.correlation import new_correlation_id
new_correlation_id()  # the pool now holds ids
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.write(write, new_correlation_id().encode())
    finally:
        os._exit(0)
os.close(write)
with os.fdopen(read, "rb") as pipe:
    child = pipe.read().decode()
os.waitpid(pid, 0)
print(child, new_correlation_id())
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_pooled_ids() -> None:
    # In a fresh interpreter: the test process runs server threads, and forking with threads
    # running is unsafe.
    out = subprocess.run(
        [sys.executable, "-c", FORK_CHECK],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    ).stdout
    child, parent = out.split()
    assert HEX32.fullmatch(child)
    assert HEX32.fullmatch(parent)
    assert child != parent


VALID = [
    "a",
    "a" * 128,
    "0123456789abcdef0123456789abcdef",
    "3f2a9c4e-8b1d-4f6a-9e0c-7b5d2a1f8e3c",
    "Req.42:retry_2-x",
]
INVALID: list[object] = [
    "",
    "a" * 129,
    "x" * 10_240,
    "has space",
    "line\r\nInjected: header",
    "tab\there",
    "nul\x00",
    "caf\u00e9",
    "\u0661\u0662",  # non-ASCII digits, which str.isalnum() accepts
    "semi;colon",
    "slash/",
    None,
    42,
    b"bytes",
]


@pytest.mark.parametrize("value", VALID)
def test_valid_ids_are_kept(value: str) -> None:
    assert is_valid_correlation_id(value)
    assert validate_correlation_id(value) == value
    with correlation_scope(value) as used:
        assert used == value
        assert get_correlation_id() == value


@pytest.mark.parametrize("value", INVALID, ids=repr)
def test_invalid_ids_are_replaced_by_a_fresh_one(value: Any) -> None:
    assert not is_valid_correlation_id(value)
    assert validate_correlation_id(value) is None
    with correlation_scope(value) as used:
        assert HEX32.fullmatch(used)
        assert get_correlation_id() == used


def test_custom_validator() -> None:
    uuid_only = CorrelationIdValidator(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", max_length=36)
    good = "3f2a9c4e-8b1d-4f6a-9e0c-7b5d2a1f8e3c"
    assert uuid_only(good) == good
    assert uuid_only("abc") is None
    assert not is_valid_correlation_id("abc", validator=uuid_only)
    assert validate_correlation_id(good, validator=uuid_only) == good
    with correlation_scope("abc", validator=uuid_only) as used:
        assert used != "abc"
    short = CorrelationIdValidator(re.compile(r"[a-z]+"), max_length=4)
    assert short.max_length == 4
    assert short("abcd") == "abcd"
    assert short("abcde") is None
    assert "max_length=4" in repr(short)
    assert "default" in repr(DEFAULT_CORRELATION_ID_VALIDATOR)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((42,), {}, TypeError),
        ((), {"max_length": 0}, ValueError),
        ((), {"max_length": 1.5}, TypeError),
        ((), {"max_length": True}, TypeError),
    ],
)
def test_bad_validator_configuration(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        CorrelationIdValidator(*args, **kwargs)


def test_scope_generates_sets_and_restores() -> None:
    assert get_correlation_id() is None
    with correlation_scope() as outer:
        assert HEX32.fullmatch(outer)
        assert get_correlation_id() == outer
        with correlation_scope("inner") as inner:
            assert inner == "inner"
            assert get_correlation_id() == "inner"
        assert get_correlation_id() == outer
    assert get_correlation_id() is None


def test_scope_restores_even_when_the_body_raises() -> None:
    with correlation_scope("outer"):
        with pytest.raises(RuntimeError), correlation_scope("inner"):
            raise RuntimeError
        assert get_correlation_id() == "outer"
    assert get_correlation_id() is None


def test_a_scope_object_is_single_use() -> None:
    scope = correlation_scope("once")
    assert repr(scope) == "correlation_scope('once')"
    with scope:
        pass
    with pytest.raises(RuntimeError), scope:
        pass
    assert get_correlation_id() is None


async def test_propagates_to_task_group_children_and_threads() -> None:
    seen: dict[str, str | None] = {}

    async def child(name: str) -> None:
        await anyio.sleep(0)
        seen[name] = get_correlation_id()

    async def child_with_own_scope() -> None:
        with correlation_scope("child-own"):
            await anyio.sleep(0)
            seen["own"] = get_correlation_id()

    with correlation_scope("request-1") as cid:
        async with anyio.create_task_group() as group:
            group.start_soon(child, "a")
            group.start_soon(child, "b")
            group.start_soon(child_with_own_scope)
        seen["thread"] = await anyio.to_thread.run_sync(get_correlation_id)
        assert get_correlation_id() == cid
    assert seen == {"a": "request-1", "b": "request-1", "own": "child-own", "thread": "request-1"}
    assert get_correlation_id() is None


async def test_concurrent_requests_do_not_see_each_other() -> None:
    seen: dict[str, list[str | None]] = {}

    async def request(cid: str) -> None:
        with correlation_scope(cid):
            observed = []
            for _ in range(5):
                await anyio.sleep(0)
                observed.append(get_correlation_id())
            observed.append(await anyio.to_thread.run_sync(get_correlation_id))
            seen[cid] = observed

    async with anyio.create_task_group() as group:
        for n in range(4):
            group.start_soon(request, f"req-{n}")
    assert seen == {f"req-{n}": [f"req-{n}"] * 6 for n in range(4)}


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(CorrelationIdFilter())
    handler.setFormatter(logging.Formatter("%(correlation_id)s %(message)s"))
    logger = logging.getLogger("resilient_voice.tests.correlation")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_filter_adds_the_id_and_a_default(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log
    logger.info("outside")
    with correlation_scope("call-7"):
        logger.info("inside")
    logger.info("explicit", extra={"correlation_id": "given"})
    assert stream.getvalue().splitlines() == ["- outside", "call-7 inside", "given explicit"]


def test_forged_ids_never_reach_the_log(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log
    forged = "abc\r\n- admin logged in"
    with correlation_scope(forged) as used:
        logger.info("hello")
    output = stream.getvalue()
    assert output == f"{used} hello\n"
    assert "admin" not in output


def test_filter_options() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert CorrelationIdFilter(default="none", attribute="cid").filter(record)
    assert record.cid == "none"
    with pytest.raises(ValueError):
        CorrelationIdFilter(attribute="not an identifier")
    with pytest.raises(TypeError):
        CorrelationIdFilter(default=None)  # type: ignore[arg-type]


def test_structlog_processor() -> None:
    assert add_correlation_id(None, "info", {"event": "x"}) == {"event": "x"}
    with correlation_scope("job-1"):
        assert add_correlation_id(None, "info", {"event": "x"}) == {
            "event": "x",
            "correlation_id": "job-1",
        }
        assert add_correlation_id(None, "info", {"correlation_id": "mine"}) == {
            "correlation_id": "mine"
        }
