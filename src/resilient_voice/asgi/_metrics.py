"""Request metrics middleware and the ``/metrics`` exposition app.

Over 400 lines: labelling a request by its route template takes the framework-specific reading
of the scope and, for requests refused before routing, a walk of the wrapped app's router
(Starlette mounts, FastAPI included routers, Litestar); both only serve the middleware's labels
and stay next to it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from resilient_voice import _validate
from resilient_voice._prometheus import get_or_create, resolve_registry
from resilient_voice.asgi._common import (
    get_header,
    respond,
    route_paths,
)
from resilient_voice.asgi._types import ASGIApp, Message, Receive, Scope, Send
from resilient_voice.metrics import PREFIX, SERVER_BUCKETS

__all__ = ["UNMATCHED", "MetricsMiddleware", "make_metrics_app"]

UNMATCHED = "__unmatched__"
"""The ``route`` label of requests that matched no route (404s, redirects, unknown paths)."""

OVERFLOW = "__overflow__"
"""The ``route`` label once ``max_routes`` distinct templates have been seen."""


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
# Refusals by middleware before any routing (a forged webhook, a rate limit, a body too large):
# labelled with the route they were aimed at.
_REFUSALS = frozenset((403, 413, 429))
_MAX_DEPTH = 64
# Routes resolved for refusals, by (method, root_path, path, host): a flood of refusals tends to
# repeat one path, and resolving walks the router. Paths are the client's, so the cache is
# bounded: it is emptied when full (a stream of distinct paths costs a resolution each, as
# without a cache, plus one clear per _AIMED_AT_CACHE of them).
_AIMED_AT_CACHE = 1024


class MetricsMiddleware:
    """Pure ASGI middleware that counts and times HTTP requests by route template.

    Metrics (``method`` is the request method, or ``OTHER`` for a method outside the standard
    nine, so clients cannot mint label values):

    - ``resilient_voice_http_server_requests_total{method,route,status_class}``
    - ``resilient_voice_http_server_request_duration_seconds{method,route,status_class}``: from
      the request's arrival until the app returned, i.e. including a streamed body.
    - ``resilient_voice_http_server_requests_in_progress{method}``
    - ``resilient_voice_http_server_refusals_total{method,route,status}``: responses with
      status 403 (a webhook guard refused a forged or unsigned request), 413 (a body over the
      limit) or 429 (the rate limiter), whoever sent them; ``status`` is the status itself,
      so the refusals ``status_class="4xx"`` lumps together are told apart per route.

    ``route`` is the framework's route template, read from the scope after the app ran:
    Starlette and FastAPI put the matched route object in ``scope["route"]`` (its
    ``path_format``, prefixed by the path of any ``Mount`` it sits under); Litestar puts the
    template in ``scope["path_template"]``. When the scope has neither (Django, Quart, routes
    FastAPI does not expose such as a plain Starlette ``Route`` added to a FastAPI app),
    ``route_template=callable(scope) -> str | None`` is asked; otherwise, or when it returns
    ``None``, the request counts as ``__unmatched__``. A request refused before routing (403, 413
    or 429 from a middleware such as the webhook checks or the rate limiter, so that the app
    set no route) is labelled with the template of the route it was aimed at: the router of the
    wrapped Starlette, FastAPI or Litestar app is found once, here, and asked which route the
    request matches, without running any endpoint. A hard cap
    (``max_routes``) on distinct templates guards against a router that exposes raw paths: later
    templates collapse into ``__overflow__``.

    The body is never buffered: messages pass straight through, and only the status of
    ``http.response.start`` is read. ``status_class`` is ``2xx`` ... ``5xx``; an app that raised
    before starting a response is counted as ``5xx`` (that is what the server sends); a request
    cancelled before a response started (client gone) is not counted. Non-HTTP scopes
    (websocket, lifespan) pass through untouched.

    Args:
        app: The ASGI app to wrap.
        registry: Where to register; default ``prometheus_client.REGISTRY``. Any number of
            instances may share one registry (the collectors are get-or-create).
        route_template: Optional ``callable(scope) -> str | None`` used when the framework
            left no route information; ``None`` means unmatched. It is called after the app
            ran, and must return a template (bounded), never the raw path.
        buckets: Latency histogram buckets (used only when this creates the histogram).
        max_routes: Distinct route templates recorded before collapsing into ``__overflow__``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry | None = None,
        route_template: Callable[[Scope], str | None] | None = None,
        buckets: Sequence[float] = SERVER_BUCKETS,
        max_routes: int = 500,
    ) -> None:
        if route_template is not None and not callable(route_template):
            raise TypeError("route_template must be a callable(scope) -> str | None")
        if isinstance(max_routes, bool) or not isinstance(max_routes, int) or max_routes < 1:
            raise ValueError(f"max_routes must be a positive int, got {max_routes!r}")
        bounds = _validate.buckets("buckets", buckets)
        reg = resolve_registry(registry)
        self.app = _validate.function("app", app)
        self._route_template = route_template
        self._router = _find_router(app)
        self._max_routes = max_routes
        self._max_children = max_routes * 64
        labels = ("method", "route", "status_class")
        self._requests = get_or_create(
            Counter,
            PREFIX + "http_server_requests",
            "HTTP requests served, by method, route template and status class.",
            labels,
            reg,
        )
        self._duration = get_or_create(
            Histogram,
            PREFIX + "http_server_request_duration_seconds",
            "Time to serve an HTTP request (including a streamed body), by route template.",
            labels,
            reg,
            buckets=bounds,
        )
        in_progress = get_or_create(
            Gauge,
            PREFIX + "http_server_requests_in_progress",
            "HTTP requests being served.",
            ("method",),
            reg,
            multiprocess_mode="livesum",
        )
        self._in_progress: dict[str, Any] = {m: in_progress.labels(m) for m in _METHODS}
        self._in_progress_other = in_progress.labels("OTHER")
        self._method_names: dict[str, str] = {m: m for m in _METHODS}
        self._templates: set[str] = set()
        self._aimed: dict[tuple[Any, ...], str | None] = {}
        self._refusals = get_or_create(
            Counter,
            PREFIX + "http_server_refusals",
            "HTTP requests refused with 403, 413 or 429 (webhook guard, body limit, rate "
            "limiter), by method, route template and status.",
            ("method", "route", "status"),
            reg,
        )
        # (method, status class index, route key...) -> (counter child, histogram child)
        self._children: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = self._method_names.get(scope["method"], "OTHER")
        gauge = self._in_progress.get(method, self._in_progress_other)
        root_path = scope.get("root_path", "")
        # Set by a router outside this app (a Starlette Mount around it): not this app's route.
        outer = scope.get("route"), scope.get("path_template")
        status = 0

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            if not status:
                status = 500
            raise
        finally:
            gauge.dec()
            if status:
                elapsed = time.perf_counter() - start
                self._observe(scope, method, root_path, outer, status, elapsed)

    def _observe(
        self,
        scope: Scope,
        method: str,
        root_path: Any,
        outer: tuple[Any, Any],
        status: int,
        elapsed: float,
    ) -> None:
        status_class = status // 100
        if not 1 <= status_class <= 5:
            status_class = 0
        elif status in _REFUSALS:
            # The status itself in the key: its children count the refusal too (see _new_children).
            status_class = status
        key: tuple[Any, ...]
        route = scope.get("route")
        if route is outer[0]:
            route = None
        if route is not None:
            added = scope.get("root_path", "")
            mount = ""
            if (
                isinstance(added, str)
                and isinstance(root_path, str)
                and added.startswith(root_path)
            ):
                mount = added[len(root_path) :]
            if mount:
                mount = _mount_template(mount, scope.get("path_params"))
            key = (method, status_class, getattr(route, "path_format", None), mount)
        else:
            template = scope.get("path_template")
            if template is outer[1]:
                template = None
            if template is None and self._route_template is not None:
                template = self._route_template(scope)
            if template is None and status in _REFUSALS and self._router is not None:
                template = self._aimed_at(scope)
            key = (method, status_class, template)
        children = self._children.get(key)
        if children is None:
            children = self._new_children(key, route)
        children[0].inc()
        children[1].observe(elapsed)
        if children[2] is not None:
            children[2].inc()

    def _aimed_at(self, scope: Scope) -> str | None:
        """The template a refused request was aimed at, resolved once per distinct request line."""
        headers = scope.get("headers")
        key = (
            scope.get("method"),
            scope.get("root_path", ""),
            scope.get("path"),
            get_header(scope, b"host") if headers else None,
        )
        aimed = self._aimed
        try:
            return aimed[key]
        except KeyError:
            pass
        except TypeError:  # an odd scope with an unhashable value: no caching
            return _aimed_at(self._router, scope)
        template = _aimed_at(self._router, scope)
        if len(aimed) >= _AIMED_AT_CACHE:
            aimed.clear()
        aimed[key] = template
        return template

    def _new_children(self, key: tuple[Any, ...], route: object) -> tuple[Any, Any, Any]:
        method, status_class, template = key[0], key[1], key[2]
        if len(key) == 4 and isinstance(template, str):
            mount = key[3]
            # A Mount matched as the final route already carries its own path in path_format.
            own = getattr(route, "path", None)
            if mount and hasattr(route, "routes") and isinstance(own, str) and mount.endswith(own):
                mount = mount[: len(mount) - len(own)]
            template = mount + template
        if not isinstance(template, str) or not template:
            template = UNMATCHED
        elif template not in self._templates:
            if len(self._templates) >= self._max_routes:
                template = OVERFLOW
            else:
                self._templates.add(template)
        refusal = None
        if status_class in _REFUSALS:
            refusal = self._refusals.labels(method, template, str(status_class))
            status_class //= 100
        labels = (method, template, _STATUS_CLASSES[status_class])
        children = (self._requests.labels(*labels), self._duration.labels(*labels), refusal)
        if len(self._children) < self._max_children:  # bounded even if keys are not
            self._children[key] = children
        return children

    def __repr__(self) -> str:
        return f"MetricsMiddleware(app={self.app!r})"


def make_metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """Return an ASGI app serving the Prometheus exposition of ``registry``.

    Mount it at ``/metrics`` (``app.mount("/metrics", make_metrics_app())`` in Starlette/FastAPI,
    ``make_asgi_app`` handlers in Litestar, or route to it in Django's ASGI application). It
    answers ``GET`` and ``HEAD`` with the text format, or OpenMetrics when the scraper asks for it
    in ``Accept``; other methods get 405. Generating the exposition runs in a worker thread so a
    large registry does not stall the event loop. Lifespan scopes are acknowledged, so the app
    can also be served on its own.

    Multiprocess mode: when ``registry`` is ``None`` and ``PROMETHEUS_MULTIPROC_DIR`` is set, it
    serves a registry with prometheus-client's ``MultiProcessCollector`` that aggregates every
    worker's files (see prometheus-client's multiprocess documentation for the worker setup).
    An explicit ``registry`` is served as given.

    Args:
        registry: The registry to expose; default as described above.
    """
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    return _MetricsApp(resolve_registry(registry))


class _MetricsApp:
    """The ASGI app :func:`make_metrics_app` returns.

    An instance rather than a function, so that routers which wrap plain functions as
    request/response endpoints (Starlette's ``Route``) treat it as an ASGI app.
    """

    __slots__ = ("registry",)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["method"] not in ("GET", "HEAD"):
            await respond(send, 405, b"Method Not Allowed\n", [(b"allow", b"GET, HEAD")])
            return
        accept = get_header(scope, b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        output: bytes = await anyio.to_thread.run_sync(encoder, self.registry)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(output)).encode("ascii")),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else output}
        )

    def __repr__(self) -> str:
        return f"make_metrics_app(registry={self.registry!r})"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _mount_template(mount: str, params: object) -> str:
    """Put ``{name}`` back where a mount's path parameters were filled in.

    Starlette records the matched (raw) prefix of a ``Mount("/tenants/{tenant}")`` in
    ``root_path``; a label must carry the template, never the value.
    """
    if not isinstance(params, dict) or not params:
        return mount
    names = {str(value): name for name, value in params.items()}
    return "/".join(f"{{{names[part]}}}" if part in names else part for part in mount.split("/"))


def _find_router(app: object) -> object:
    """The router of the wrapped app, through any middleware in between, or ``None``.

    A Litestar application (its ``asgi_router``), or a Starlette/FastAPI ``Router`` (an app's
    ``router``, or the router itself at the end of a middleware stack); middleware is followed
    through its ``app`` attribute.
    """
    for _ in range(_MAX_DEPTH):
        if app is None:
            return None
        litestar = getattr(app, "asgi_router", None)
        if litestar is not None and callable(getattr(litestar, "handle_routing", None)):
            return litestar
        router = getattr(app, "router", None)
        if router is not None and isinstance(getattr(router, "routes", None), list):
            return router
        if isinstance(getattr(app, "routes", None), list) and hasattr(app, "redirect_slashes"):
            return app
        app = getattr(app, "app", None)
    return None


def _aimed_at(router: Any, scope: Scope) -> str | None:
    """The route template a request refused before routing would have reached, or ``None``."""
    try:
        if hasattr(router, "handle_routing"):  # Litestar: routes on its reading of the path
            paths = route_paths(scope)
            if not paths:
                return None
            template = router.handle_routing(path=paths[-1], method=scope.get("method"))[4]
            return template if isinstance(template, str) else None
        return _starlette_template(router.routes, scope, "", 0)
    except Exception:  # noqa: BLE001  # no route (Litestar raises NotFound) or an odd router
        return None


def _starlette_template(routes: Any, scope: Scope, prefix: str, depth: int) -> str | None:
    partial: tuple[Any, Any] | None = None
    for route in routes:
        match, child = route.matches(scope)
        name = getattr(match, "name", "NONE")
        if name == "FULL":
            return _starlette_label(route, scope, child, prefix, depth)
        if name == "PARTIAL" and partial is None:
            partial = route, child
    if partial is not None:
        return _starlette_label(partial[0], scope, partial[1], prefix, depth)
    return None


def _starlette_label(route: Any, scope: Scope, child: Any, prefix: str, depth: int) -> str | None:
    inner = getattr(route, "routes", None)
    if inner is None:  # FastAPI (0.16x) wraps an included router; its routes hold the prefix
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        child = {}
    if inner and depth < _MAX_DEPTH:  # a Mount or Host: the route inside it
        mount = getattr(route, "path", "") if hasattr(route, "path") else ""
        return _starlette_template(inner, {**scope, **child}, prefix + mount, depth + 1)
    template = getattr(route, "path_format", None)
    return prefix + template if isinstance(template, str) else None
