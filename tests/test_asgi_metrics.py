"""MetricsMiddleware and make_metrics_app, served by uvicorn in Starlette, FastAPI and Litestar."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.routing import Route

from _apps import FRAMEWORKS, STREAM_GATE, build, http_client, serve_sync
from resilient_voice.asgi import MetricsMiddleware, make_metrics_app
from resilient_voice.testing import serve

REQUESTS = "resilient_voice_http_server_requests_total"
DURATION = "resilient_voice_http_server_request_duration_seconds_count"
IN_PROGRESS = "resilient_voice_http_server_requests_in_progress"

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Served:
    def __init__(self, url: str, registry: CollectorRegistry, framework: str) -> None:
        self.url = url
        self.registry = registry
        self.framework = framework

    def count(self, method: str, route: str, status_class: str) -> float:
        labels = {"method": method, "route": route, "status_class": status_class}
        return self.registry.get_sample_value(REQUESTS, labels) or 0.0


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Served]]:
    """One server per framework for the whole module (started on first use)."""
    started: dict[str, Served] = {}
    with ExitStack() as stack:

        class Lazy(dict[str, Served]):
            def __missing__(self, framework: str) -> Served:
                registry = CollectorRegistry()
                app = build(framework, MetricsMiddleware, registry=registry)
                url = stack.enter_context(serve_sync(app))
                self[framework] = Served(url, registry, framework)
                return self[framework]

        yield Lazy(started)


@pytest.fixture(params=FRAMEWORKS)
def served(request: pytest.FixtureRequest, servers: dict[str, Served]) -> Served:
    return servers[request.param]


async def eventually(check: Callable[[], bool]) -> None:
    """The server records after the app returns, which can be just after the client has read."""
    with anyio.fail_after(2.0):
        while not check():
            await anyio.sleep(0.005)


TEMPLATES = {
    "starlette": ("/items/{item_id}", "/api/things/{thing_id}"),
    "fastapi": ("/items/{item_id}", "/api/things/{thing_id}"),
    "litestar": ("/items/{item_id}", "/api/things/{thing_id}"),  # Litestar drops the type
}


async def test_requests_are_counted_by_route_template_not_raw_path(served: Served) -> None:
    item, thing = TEMPLATES[served.framework]
    before = served.count("GET", item, "2xx"), served.count("GET", thing, "2xx")
    async with http_client(base_url=served.url) as client:
        for n in range(3):
            assert (await client.get(f"/items/{n}")).status_code == 200
        assert (await client.get("/api/things/555-0100")).status_code == 200
    await eventually(lambda: served.count("GET", item, "2xx") == before[0] + 3)
    await eventually(lambda: served.count("GET", thing, "2xx") == before[1] + 1)
    samples = [s for m in served.registry.collect() for s in m.samples]
    assert not any("555-0100" in str(s.labels) or "/items/1" in str(s.labels) for s in samples)
    labels = {"method": "GET", "route": item, "status_class": "2xx"}
    await eventually(lambda: served.registry.get_sample_value(DURATION, labels) == before[0] + 3)


async def test_unmatched_paths_and_odd_methods_collapse(served: Served) -> None:
    before = served.count("GET", "__unmatched__", "4xx")
    before_other = sum(
        served.count("OTHER", route, "4xx")
        for route in ("__unmatched__", *TEMPLATES[served.framework])
    )
    async with http_client(base_url=served.url) as client:
        for n in range(4):
            assert (await client.get(f"/no/such/{n}")).status_code == 404
        response = await client.request("BREW", "/items/1")
        assert response.status_code in (404, 405)
    await eventually(lambda: served.count("GET", "__unmatched__", "4xx") == before + 4)
    await eventually(
        lambda: (
            sum(
                served.count("OTHER", route, "4xx")
                for route in ("__unmatched__", *TEMPLATES[served.framework])
            )
            == before_other + 1
        )
    )


async def test_app_errors_count_as_5xx(served: Served) -> None:
    before = served.count("GET", "/boom", "5xx")
    async with http_client(base_url=served.url) as client:
        assert (await client.get("/boom")).status_code == 500
    await eventually(lambda: served.count("GET", "/boom", "5xx") == before + 1)
    await eventually(
        lambda: served.registry.get_sample_value(IN_PROGRESS, {"method": "GET"}) == 0.0
    )


async def test_streaming_responses_stay_streamed(served: Served) -> None:
    STREAM_GATE.clear()
    before = served.count("GET", "/stream", "2xx")
    in_progress_during = None
    async with (
        http_client(base_url=served.url, timeout=2.0) as client,
        client.stream("GET", "/stream") as response,
    ):
        chunks = response.aiter_raw()
        with anyio.fail_after(2.0):
            first = await chunks.__anext__()
        # The first chunk arrived while the handler is still blocked on the gate.
        assert first == b"first\n"
        in_progress_during = served.registry.get_sample_value(IN_PROGRESS, {"method": "GET"})
        STREAM_GATE.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"second\n"
    assert in_progress_during == 1.0
    await eventually(lambda: served.count("GET", "/stream", "2xx") == before + 1)


def test_building_the_app_twice_on_one_registry_does_not_raise() -> None:
    registry = CollectorRegistry()
    for framework in FRAMEWORKS:
        build(framework, MetricsMiddleware, registry=registry)
        build(framework, MetricsMiddleware, registry=registry)
    names = {m.name for m in registry.collect()}
    assert {
        "resilient_voice_http_server_requests",
        "resilient_voice_http_server_request_duration_seconds",
        "resilient_voice_http_server_requests_in_progress",
    } <= names


def test_default_registry_is_used_and_reused() -> None:
    from prometheus_client import REGISTRY

    MetricsMiddleware(_noop)
    MetricsMiddleware(_noop)
    assert REGISTRY.get_sample_value(IN_PROGRESS, {"method": "GET"}) is not None


def test_conflicting_metric_is_a_clear_error() -> None:
    registry = CollectorRegistry()
    Counter("resilient_voice_http_server_requests", "not ours", ["path"], registry=registry)
    with pytest.raises(ValueError, match="already registered"):
        MetricsMiddleware(_noop, registry=registry)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_max_routes_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_routes"):
        MetricsMiddleware(_noop, registry=CollectorRegistry(), max_routes=bad)


async def _noop(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class _Route:
    def __init__(self, path_format: str) -> None:
        self.path_format = path_format


async def _routed(scope: Any, receive: Any, send: Any) -> None:
    scope["route"] = _Route(scope["path"])  # a router that (wrongly) exposes raw paths
    await _noop(scope, receive, send)


async def _call(app: Any, path: str, method: str = "GET", type_: str = "http") -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": type_, "method": method, "path": path, "root_path": "", "headers": []}
    await app(scope, receive, send)
    return sent


async def test_route_cardinality_is_capped() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_routed, registry=registry, max_routes=3)
    for n in range(10):
        await _call(app, f"/calls/CA{n}")
    routes = {
        s.labels["route"]
        for m in registry.collect()
        if m.name == "resilient_voice_http_server_requests"
        for s in m.samples
        if s.name == REQUESTS
    }
    assert routes == {"/calls/CA0", "/calls/CA1", "/calls/CA2", "__overflow__"}
    assert (
        registry.get_sample_value(
            REQUESTS, {"method": "GET", "route": "__overflow__", "status_class": "2xx"}
        )
        == 7.0
    )


async def test_route_template_callable_is_the_fallback() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(
        _noop,
        registry=registry,
        route_template=lambda scope: (
            "/calls/{sid}" if scope["path"].startswith("/calls/") else None
        ),
    )
    await _call(app, "/calls/CA1")
    await _call(app, "/elsewhere")
    labels = {"method": "GET", "route": "/calls/{sid}", "status_class": "2xx"}
    assert registry.get_sample_value(REQUESTS, labels) == 1.0
    labels["route"] = "__unmatched__"
    assert registry.get_sample_value(REQUESTS, labels) == 1.0


async def test_non_http_scopes_pass_through_unmeasured() -> None:
    registry = CollectorRegistry()
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = MetricsMiddleware(app, registry=registry)
    await _call(middleware, "/ws", type_="websocket")
    await _call(middleware, "/", type_="lifespan")
    assert seen == ["websocket", "lifespan"]
    assert not [s for m in registry.collect() for s in m.samples if s.name == REQUESTS]


async def test_cancelled_request_is_not_counted_and_gauge_returns_to_zero() -> None:
    registry = CollectorRegistry()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(10)

    middleware = MetricsMiddleware(slow, registry=registry)
    with anyio.move_on_after(0.01):
        await _call(middleware, "/slow")
    assert registry.get_sample_value(IN_PROGRESS, {"method": "GET"}) == 0.0
    assert not [s for m in registry.collect() for s in m.samples if s.name == REQUESTS]


async def test_framework_route_wins_over_the_callable() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_routed, registry=registry, route_template=lambda scope: "/fallback")
    await _call(app, "/calls/CA1")
    labels = {"method": "GET", "route": "/calls/CA1", "status_class": "2xx"}
    assert registry.get_sample_value(REQUESTS, labels) == 1.0


async def test_metrics_app_serves_the_exposition_on_starlette_route() -> None:
    registry = CollectorRegistry()
    Counter("rv_test_things", "things", registry=registry).inc(3)
    app = Starlette(routes=[Route("/metrics", make_metrics_app(registry))])
    async with serve(app) as url, http_client(base_url=url) as client:
        text = await client.get("/metrics")
        openmetrics = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
        head = await client.head("/metrics")
        post = await client.post("/metrics")
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain; version=")
    assert "rv_test_things_total 3.0" in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert head.status_code == 200
    assert head.content == b""
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


async def test_metrics_app_serves_standalone_with_lifespan() -> None:
    registry = CollectorRegistry()
    Counter("rv_standalone", "x", registry=registry).inc()
    async with serve(make_metrics_app(registry)) as url, http_client(base_url=url) as client:
        response = await client.get("/anything")
    assert "rv_standalone_total 1.0" in response.text


@pytest.mark.slow
async def test_metrics_app_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker process writes its counters into the directory; the app aggregates them.
    code = (
        "from prometheus_client import Counter;"
        "Counter('rv_worker_jobs', 'jobs', ['kind']).labels('call').inc(2)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": SRC}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=30)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = make_metrics_app()
    sent = await _call(app, "/metrics")
    assert sent[0]["status"] == 200
    assert b'rv_worker_jobs_total{kind="call"} 4.0' in sent[1]["body"]


def test_metrics_app_multiprocess_needs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="directory"):
        make_metrics_app()


async def test_parameterised_mount_labels_carry_the_template_not_the_value() -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    registry = CollectorRegistry()
    inner = Starlette(routes=[Mount("/tenants/{tenant}", routes=[Route("/items/{item}", item)])])
    app = MetricsMiddleware(inner, registry=registry)
    for tenant in ("acme", "globex", "initech"):
        await _call(app, f"/tenants/{tenant}/items/42")
    routes = {
        s.labels["route"]
        for m in registry.collect()
        if m.name == "resilient_voice_http_server_requests"
        for s in m.samples
        if s.name == REQUESTS
    }
    assert routes == {"/tenants/{tenant}/items/{item}"}
