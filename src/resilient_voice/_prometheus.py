"""Get-or-create for prometheus-client collectors, shared by every module that declares metrics.

prometheus-client raises "Duplicated timeseries" when a second collector with the same name is
registered in one registry. The listener of :mod:`resilient_voice.metrics` and the middleware of
:mod:`resilient_voice.asgi` both declare collectors that must survive being built twice in one
process, so both look them up here first and create them only when absent.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["get_or_create", "resolve_registry"]

_C = TypeVar("_C", Counter, Gauge, Histogram)
_lock = threading.Lock()


def get_or_create(
    cls: type[_C],
    name: str,
    documentation: str,
    labelnames: Sequence[str],
    registry: CollectorRegistry,
    **kwargs: Any,
) -> _C:
    """Return the collector called ``name`` in ``registry``, creating it if absent.

    An existing collector is reused only when it has the same type and label names; anything else
    is a real conflict and raises ``ValueError`` naming the metric.

    Args:
        cls: ``Counter``, ``Gauge`` or ``Histogram``.
        name: Full metric name (for counters, without the ``_total`` suffix).
        documentation: The HELP text.
        labelnames: The label names, in order.
        registry: Where to look and register.
        **kwargs: Passed to the constructor when creating (``buckets``, ``multiprocess_mode``).

    Raises:
        ValueError: ``name`` is taken by an incompatible collector.
    """
    labels = tuple(labelnames)
    with _lock:
        # prometheus-client has no public lookup; _names_to_collectors has been stable since 0.1.
        names: dict[str, object] = getattr(registry, "_names_to_collectors", {})
        existing = names.get(name)
        if existing is None:
            return cls(name, documentation, labels, registry=registry, **kwargs)
        if type(existing) is not cls or tuple(getattr(existing, "_labelnames", ())) != labels:
            raise ValueError(
                f"metric {name!r} is already registered as {type(existing).__name__} with labels "
                f"{getattr(existing, '_labelnames', ())!r}; expected {cls.__name__} with {labels!r}"
            )
        return existing


def resolve_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """The registry to register in: ``registry``, checked, or the process-wide default."""
    if registry is None:
        return REGISTRY
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client.CollectorRegistry, not {registry!r}")
    return registry
