"""The one check that a callable handed to a primitive is async, made before it is called.

A breaker, a retry policy or a policy awaits what the function returns. Given a plain function
it would call it first, so the function's work (with the twilio SDK's synchronous
``client.calls.create``: placing the call) would happen before the ``await`` failed, and the
failure would be counted against the upstream. The check therefore runs before anything is
called: once at decoration time for decorators, and on every ``call(fn, ...)``.

Accepted: a coroutine function, a bound method of one, a :func:`functools.partial` (nested or
not) of any of these, and an object whose class defines ``async def __call__``. The answer comes
from the function's code flags (through :func:`inspect.iscoroutinefunction`), never from calling
it or from its arguments. The common cases (a plain ``async def`` function or a bound method of
one) are answered from the code flags directly, in tens of nanoseconds.
"""

from __future__ import annotations

import functools
import inspect
from types import FunctionType, MethodType
from typing import Final

__all__ = ["is_async_callable", "require_async_callable"]

_CO_COROUTINE: Final = inspect.CO_COROUTINE


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine, judged without calling it."""
    kind = type(fn)
    if kind is FunctionType:
        if fn.__code__.co_flags & _CO_COROUTINE:  # type: ignore[attr-defined]
            return True
    elif kind is MethodType:
        func = fn.__func__  # type: ignore[attr-defined]
        if type(func) is FunctionType and func.__code__.co_flags & _CO_COROUTINE:
            return True
    return _is_async_callable(fn)


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if isinstance(fn, type) or not callable(fn):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)


def require_async_callable(fn: object, where: str) -> None:
    """Refuse ``fn`` unless :func:`is_async_callable` accepts it.

    Args:
        fn: What the caller passed.
        where: The API that refuses it, as the caller wrote it (``"CircuitBreaker.call()"``).

    Raises:
        TypeError: ``fn`` is not an async callable; it has not been called.
    """
    if not is_async_callable(fn):
        raise TypeError(_refusal(fn, where))


def _refusal(fn: object, where: str) -> str:
    if inspect.isasyncgenfunction(fn):
        what = "an async generator function"
    elif not callable(fn):
        what = f"not callable ({type(fn).__name__})"
    else:
        what = "not an async function"
    return (
        f"{where} needs an async function (async def) and calls it itself; {fn!r} is {what}, "
        "so it was not called. Pass the async function itself (with the twilio SDK: "
        "client.calls.create_async, not client.calls.create), or put the call in an async def "
        "and pass that."
    )
