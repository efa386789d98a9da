"""Every public exception survives pickling with its fields (errors cross process boundaries).

The classes are discovered from the ``__all__`` of every public module of the package, and their
instances built from the constructors' annotations, so a new public exception is covered
without touching this file.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import types
import typing
from typing import Any

import httpx
import pytest

import resilient_voice
from resilient_voice import FailureKind
from resilient_voice.http import UpstreamStatusError

SECRET = "s3cret-in-the-request"


def _round_trip(obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> Any:
    return pickle.loads(pickle.dumps(obj, protocol=protocol))  # noqa: S301  # our own bytes


def _public_modules() -> list[types.ModuleType]:
    modules = [resilient_voice]
    for info in pkgutil.walk_packages(resilient_voice.__path__, "resilient_voice."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


# Raised to callers but not in any ``__all__`` (callers catch them by their built-in base).
_ALSO_RAISED = [
    ("resilient_voice.failure", "ConcurrentUseError"),
    ("resilient_voice.failure", "NotAwaitableError"),
    ("resilient_voice.failure", "NotSentError"),
    ("resilient_voice.failure", "OutOfTimeError"),
    ("resilient_voice.testing._serve", "DropConnectionError"),
]


def _public_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    named = [(m.__name__, name) for m in _public_modules() for name in getattr(m, "__all__", ())]
    for module_name, name in [*named, *_ALSO_RAISED]:
        obj = getattr(importlib.import_module(module_name), name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[key] for key in sorted(found)]


EXCEPTIONS = _public_exceptions()


def _response() -> httpx.Response:
    request = httpx.Request(
        "POST",
        "https://user:pw@api.example.com/2010-04-01/Accounts/AC1/Calls.json",
        headers={"Authorization": f"Basic {SECRET}"},
    )
    return httpx.Response(
        503, headers={"Retry-After": "2"}, content=b'{"message": "down"}', request=request
    )


def _sample(annotation: Any, name: str) -> Any:
    """A non-default value of the annotated type (the first non-None member of a union)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _sample(members[0], name)
    if annotation is str:
        return f"{name}-value"
    if annotation is bool:
        return True
    if annotation is int:
        return 429
    if annotation is float:
        return 2.5
    if annotation is FailureKind:
        return FailureKind.MAYBE_PROCESSED
    if annotation is httpx.Response:
        return _response()
    if annotation is object or annotation is Any:
        return {"name": name, "items": [1, 2]}
    if origin is dict:
        return {"name": name, "items": [1, 2]}
    raise AssertionError(f"teach _sample about {annotation!r} (parameter {name})")


def _instance(cls: type[BaseException]) -> BaseException:
    if cls.__init__ in (BaseException.__init__, Exception.__init__):
        return cls("a message")
    hints = typing.get_type_hints(cls.__init__)
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = _sample(hints[name], name)
        if parameter.kind is parameter.KEYWORD_ONLY:
            keywords[name] = value
        else:
            positional.append(value)
    return cls(*positional, **keywords)


def _comparable(value: Any) -> Any:
    if isinstance(value, httpx.Response):
        return (value.status_code, value.headers.get("retry-after"), value.content)
    return value


def _fields(exc: BaseException) -> dict[str, Any]:
    return {key: _comparable(value) for key, value in vars(exc).items()}


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=[cls.__name__ for cls in EXCEPTIONS])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_every_public_exception_round_trips_through_pickle(
    cls: type[BaseException], protocol: int
) -> None:
    original = _instance(cls)
    original.add_note("attempt 1 of 3")
    copy = _round_trip(original, protocol)
    assert type(copy) is cls
    assert copy.args == original.args
    assert str(copy) == str(original)
    assert _fields(copy) == _fields(original)
    assert copy.__notes__ == ["attempt 1 of 3"]


def test_the_discovery_finds_the_documented_exceptions() -> None:
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {
        "CircuitOpenError",
        "OutcomeUnknownError",
        "ProviderError",
        "RateLimitedError",
        "TwilioAPIError",
        "InvalidRequestError",
        "UpstreamStatusError",
        "VapiConcurrencyLimitError",
        "WebhookVerificationError",
        "DropConnectionError",
    } <= names


def test_fields_that_differ_from_the_constructor_arguments_survive() -> None:
    from resilient_voice import OutcomeUnknownError, ProviderError

    unknown = OutcomeUnknownError("att-1", attempts=3, message="custom text")
    copy = _round_trip(unknown)
    assert (copy.attempt_id, copy.attempts, str(copy)) == ("att-1", 3, "custom text")
    provider = ProviderError(503, 20503, "down", FailureKind.MAYBE_PROCESSED, retry_after=1.5)
    again = _round_trip(provider)
    assert (again.status, again.code, again.message, again.kind, again.retry_after) == (
        503,
        20503,
        "down",
        FailureKind.MAYBE_PROCESSED,
        1.5,
    )
    assert again.failure_kind is FailureKind.MAYBE_PROCESSED


def test_a_pickled_upstream_status_error_leaves_the_credentials_behind() -> None:
    error = UpstreamStatusError(_response(), FailureKind.MAYBE_PROCESSED, 2.0)
    data = pickle.dumps(error)
    assert SECRET.encode() not in data
    assert b"pw@" not in data
    copy = pickle.loads(data)  # noqa: S301  # our own bytes
    assert copy.response.request.method == "POST"
    assert str(copy.response.request.url) == (
        "https://api.example.com/2010-04-01/Accounts/AC1/Calls.json"
    )
    assert copy.response.json() == {"message": "down"}
    assert copy.backpressure is False
    # The live error still holds the real request: pickling copied, it did not strip.
    assert error.response.request.headers["authorization"] == f"Basic {SECRET}"
