"""How a public package presents names defined in its private modules.

Every public package re-exports from underscore modules. Two chores come with that, done here
once for all of them:

- :func:`publish` gives the exported classes and functions their public ``__module__`` (as httpx
  does), so reprs, tracebacks and docs show ``resilient_voice.breaker.CircuitBreaker`` rather
  than ``resilient_voice.breaker._facade.CircuitBreaker``;
- :func:`lazy_exports` builds the module ``__getattr__`` and ``__dir__`` that import a name's
  module on first access, so that importing a package does not import an optional dependency
  (httpx, twilio, prometheus-client, uvicorn) until the name that needs it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any


def _publish_one(public: str, value: object) -> None:
    owner = getattr(value, "__module__", None)
    if (
        (isinstance(value, type) or callable(value))
        and isinstance(owner, str)
        and owner.startswith(f"{public}._")
    ):
        value.__module__ = public


def publish(namespace: dict[str, Any], names: Iterable[str]) -> None:
    """Show ``namespace``'s module as the home of ``names`` defined in its private submodules.

    Names absent from ``namespace`` (lazy ones) are skipped: :func:`lazy_exports` publishes
    them when they are first loaded.
    """
    public = namespace["__name__"]
    for name in names:
        if name in namespace:
            _publish_one(public, namespace[name])


def lazy_exports(
    namespace: dict[str, Any], lazy: Mapping[str, str], listed: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return a module ``__getattr__`` and ``__dir__`` serving ``lazy`` names on first access.

    Args:
        namespace: The package's ``globals()``; a loaded value is cached there, so the module
            ``__getattr__`` runs once per name.
        lazy: Name -> absolute module path that defines it.
        listed: The names ``dir()`` shows (``__all__``, plus any extras the package serves).
    """
    public = namespace["__name__"]
    shown = sorted(set(listed))

    def __getattr__(name: str) -> Any:  # noqa: N807  (the module-level hook's name)
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {public!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        _publish_one(public, value)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return list(shown)

    return __getattr__, __dir__
