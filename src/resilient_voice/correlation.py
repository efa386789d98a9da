"""The correlation id of the current request or job, carried by a ContextVar.

One id ties together everything done for one inbound request (a webhook, an API call to your
service): the log lines, the outbound Twilio and Vapi requests, the retries. It lives in a
:class:`contextvars.ContextVar`, so it flows through ``await``, into tasks started from an anyio
task group and into ``anyio.to_thread.run_sync`` workers, and never leaks between concurrent
requests.

Ids arriving from outside (an ``X-Request-ID`` header, a job payload) are untrusted. Every entry
point validates them: only 1..128 characters of ``[A-Za-z0-9._:-]`` are accepted by default, and
anything else (CR/LF, spaces, non-ASCII, a 10 kB string) is replaced by a fresh id, so a forged
value can never be copied into a log line or an outgoing header.

Generated ids are 32 lowercase hex characters (128 random bits) from ``os.urandom``, drawn in
batches: about 0.3 µs each, against about 2.5 µs for ``uuid.uuid4().hex``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping
from contextvars import Token
from types import TracebackType
from typing import Any

from resilient_voice._correlation_id import CORRELATION_ID, DEFAULT_ID_PATTERN, is_valid_default

__all__ = [
    "CorrelationIdFilter",
    "CorrelationIdValidator",
    "add_correlation_id",
    "correlation_scope",
    "get_correlation_id",
]

# Ids are cut from one os.urandom call per batch: the system call, not the hex formatting, is
# the cost of a single os.urandom(16).hex().
_BATCH = 128
_pool: list[str] = []


def _refill() -> str:
    hexed = os.urandom(16 * _BATCH).hex()
    _pool.extend([hexed[i : i + 32] for i in range(32, 32 * _BATCH, 32)])
    return hexed[:32]


if hasattr(os, "register_at_fork"):  # pragma: no branch
    # A forked worker must not hand out the ids its parent already had in the pool.
    os.register_at_fork(after_in_child=_pool.clear)


def new_correlation_id() -> str:
    """Return a fresh id: 32 lowercase hex characters (128 bits from ``os.urandom``).

    Safe to call from any thread (``list.pop`` is atomic) and after ``fork`` (the child drops
    the pool it inherited).
    """
    try:
        return _pool.pop()
    except IndexError:
        return _refill()


def new_attempt_id() -> str:
    """Return a fresh operation id for :meth:`RetryPolicy.run`, in the correlation id format.

    One attempt id is shared by every attempt of one logical operation, so that the application
    can find out upstream whether a call whose outcome is unknown was placed.
    """
    return new_correlation_id()


class CorrelationIdValidator:
    """Decides whether an incoming id may be used as is.

    The length is checked before anything else, so a 10 kB header costs nothing to reject. With
    no ``pattern`` the default alphabet ``[A-Za-z0-9._:-]`` is enforced, with a fast path for
    purely alphanumeric ids (generated ones, most upstream ones).

    Args:
        pattern: A regular expression (compiled here once, or already compiled) that the whole
            id must match. Keep it to characters that are safe in a log line and an HTTP header.
        max_length: The longest id accepted, at least 1.

    Raises:
        TypeError: ``pattern`` is neither a string nor a compiled pattern.
        ValueError: ``max_length`` is less than 1.
    """

    __slots__ = ("_default", "_max_length", "_pattern")

    def __init__(
        self, pattern: str | re.Pattern[str] | None = None, *, max_length: int = 128
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {max_length!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length!r}")
        if pattern is None:
            compiled = None
        elif isinstance(pattern, str):
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a regular expression: {exc}") from None
        elif isinstance(pattern, re.Pattern):
            compiled = pattern
        else:
            raise TypeError(f"pattern must be a str or re.Pattern, got {pattern!r}")
        self._pattern = compiled
        self._max_length = max_length
        self._default = compiled is None and max_length == 128

    @property
    def max_length(self) -> int:
        """The longest id accepted."""
        return self._max_length

    def is_valid(self, value: object) -> bool:
        """Return True when ``value`` is a string this validator accepts."""
        if self._default:
            return is_valid_default(value)
        if not isinstance(value, str) or not 0 < len(value) <= self._max_length:
            return False
        if self._pattern is None:
            return value.isascii() and (
                value.isalnum() or DEFAULT_ID_PATTERN.fullmatch(value) is not None
            )
        return self._pattern.fullmatch(value) is not None

    def __call__(self, value: object) -> str | None:
        """Return ``value`` when it is valid, else ``None``."""
        return value if self.is_valid(value) else None  # type: ignore[return-value]

    def __repr__(self) -> str:
        pattern = "default" if self._pattern is None else repr(self._pattern.pattern)
        return f"CorrelationIdValidator(pattern={pattern}, max_length={self._max_length})"


DEFAULT_CORRELATION_ID_VALIDATOR = CorrelationIdValidator()
"""Accepts 1..128 characters of ``[A-Za-z0-9._:-]``."""


def is_valid_correlation_id(
    value: object, *, validator: CorrelationIdValidator | None = None
) -> bool:
    """Return True when ``value`` is acceptable as a correlation id.

    Args:
        value: The candidate, usually a header value.
        validator: The rules; :data:`DEFAULT_CORRELATION_ID_VALIDATOR` when omitted.
    """
    if validator is None:
        return is_valid_default(value)
    return validator.is_valid(value)


def validate_correlation_id(
    value: object, *, validator: CorrelationIdValidator | None = None
) -> str | None:
    """Return ``value`` when it is an acceptable correlation id, else ``None``."""
    if validator is None:
        return value if is_valid_default(value) else None  # type: ignore[return-value]
    return validator(value)


def get_correlation_id() -> str | None:
    """Return the correlation id of the current context, or ``None`` outside any scope."""
    return CORRELATION_ID.get()


class correlation_scope:  # noqa: N801  (used like a function: ``with correlation_scope():``)
    """Set the correlation id for the body of a ``with`` block, then restore the previous one.

    A plain (synchronous) context manager, usable in sync and async code alike: the id is set
    on the current context, so every ``await`` in the block, every task started from a task
    group inside it and every ``anyio.to_thread.run_sync`` call sees it. The previous value is
    restored on exit through the ContextVar token, even when the block raises.

    An invalid ``correlation_id`` (see :class:`CorrelationIdValidator`) is silently replaced by a
    fresh one: compare the yielded id with the one you passed if you need to know.

    Args:
        correlation_id: The id to use, typically from an inbound header; ``None`` generates one.
        validator: The rules for ``correlation_id``; the default accepts 1..128 characters of
            ``[A-Za-z0-9._:-]``.

    Example::

        with correlation_scope(request.headers.get("x-request-id")) as cid:
            log.info("placing call")  # record.correlation_id == cid

    A scope object is single-use: enter it once.
    """

    __slots__ = ("_id", "_token")

    def __init__(
        self,
        correlation_id: str | None = None,
        *,
        validator: CorrelationIdValidator | None = None,
    ) -> None:
        if validator is not None and not isinstance(validator, CorrelationIdValidator):
            raise TypeError(f"validator must be a CorrelationIdValidator, got {validator!r}")
        if correlation_id is None or not (
            is_valid_default(correlation_id)
            if validator is None
            else validator.is_valid(correlation_id)
        ):
            correlation_id = new_correlation_id()
        self._id = correlation_id
        self._token: Token[str | None] | None = None

    def __enter__(self) -> str:
        if self._token is not None:
            raise RuntimeError("a correlation_scope can be entered only once")
        self._token = CORRELATION_ID.set(self._id)
        return self._id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is not None:
            CORRELATION_ID.reset(token)

    def __repr__(self) -> str:
        return f"correlation_scope({self._id!r})"


class CorrelationIdFilter(logging.Filter):
    """A logging filter that adds the current correlation id to every record.

    Attach it to a handler (or a logger) and use ``%(correlation_id)s`` in the format. Outside
    any scope the attribute is ``default``. A record that already carries the attribute (set
    with ``extra=``, or re-handled by a ``QueueListener`` in another thread) is left alone. The
    filter never drops a record.

    Args:
        name: Passed to :class:`logging.Filter` (it only applies when attached to a logger).
        default: The value used outside any correlation scope.
        attribute: The record attribute to set.
    """

    def __init__(
        self, name: str = "", *, default: str = "-", attribute: str = "correlation_id"
    ) -> None:
        for option, value in (("name", name), ("default", default)):
            if not isinstance(value, str):
                raise TypeError(f"{option} must be a str, got {value!r}")
            if not value.isprintable():
                raise ValueError(f"{option} must hold printable characters only, got {value!r}")
        super().__init__(name)
        if not isinstance(attribute, str) or not attribute.isidentifier():
            raise ValueError(f"attribute must be an identifier, got {attribute!r}")
        self.default = default
        self.attribute = attribute

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self.attribute, None) is None:
            value = CORRELATION_ID.get()
            setattr(record, self.attribute, self.default if value is None else value)
        return True


def add_correlation_id(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor that adds ``correlation_id`` to the event dict when one is set.

    Put it in ``structlog.configure(processors=[...])`` before the renderer. An explicit
    ``correlation_id=`` in the log call wins. It needs nothing from structlog itself.
    """
    value = CORRELATION_ID.get()
    if value is not None:
        event_dict.setdefault("correlation_id", value)
    return event_dict
