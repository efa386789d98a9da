"""Path matching of every middleware: root paths, mounts, path spellings and odd scopes.

Each middleware matches the path the application routes on, whether the app is mounted
(Starlette ``Mount``, FastAPI ``app.mount()``) or served with a root path (uvicorn's, which puts
the prefix in ``path`` too, and hypercorn's, which does not), and whatever spelling of the path
a framework still routes to the handler. Servers are real (uvicorn, hypercorn) on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.middleware import DefineMiddleware
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Mount
from twilio.request_validator import RequestValidator

from _apps import (
    FRAMEWORKS,
    _ls_form,
    _ls_raw,
    _ls_text,
    build,
    http_client,
    serve_hypercorn_sync,
    serve_sync,
)
from resilient_voice.asgi import (
    MetricsMiddleware,
    RateLimitMiddleware,
    TwilioSignatureMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.asgi._common import PathMatcher, normalise_path, route_paths
from resilient_voice.asgi._ratelimit import RouteMatcher
from resilient_voice.testing import ManualClock

TOKEN = "12345678901234567890123456789012"
SECRET = "vapi-secret"
PREFIX = "/hooks"
FORM = {"content-type": "application/x-www-form-urlencoded"}
PAIRS = [("CallSid", "CA1234"), ("CallStatus", "completed"), ("Digits", "1"), ("Digits", "2")]
BODY = urlencode(PAIRS).encode()
SHAPES = ("plain", "mounted", "uvicorn_root", "hypercorn_root")
# Per shape: the prefixes under which a client reaches the app's routes, the one a genuine
# request uses, and the prefix of the URL Twilio signed (the public URL, as a proxy in front of
# the root-path deployments would have forwarded it with /hooks stripped).
REACH = {
    "plain": ([""], "", ""),
    "mounted": ([PREFIX], PREFIX, PREFIX),
    "uvicorn_root": ([""], "", PREFIX),
    # hypercorn leaves the prefix out of `path`; a client may still send it, and Starlette and
    # Litestar then strip it and route to the handler.
    "hypercorn_root": (["", PREFIX], PREFIX, PREFIX),
}
REGISTRIES: dict[tuple[str, str], CollectorRegistry] = {}


def sign(url: str, pairs: list[tuple[str, str]], secret: str = TOKEN) -> str:
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)

    class Multi(dict[str, list[str]]):
        def getall(self, name: str) -> list[str]:
            return self[name]

    return str(RequestValidator(secret).compute_signature(url, Multi(params)))


async def eventually(check: Callable[[], bool]) -> None:
    """The server records metrics after the app returns, which can be after the client read."""
    with anyio.fail_after(2.0):
        while not check():
            await anyio.sleep(0.005)


def client_key(scope: Any) -> str:
    return dict(scope["headers"]).get(b"x-client", b"").decode()


def middleware(kind: str, framework: str, shape: str) -> tuple[type[Any], dict[str, Any]]:
    if kind == "twilio":
        return TwilioSignatureMiddleware, {"auth_token": TOKEN, "paths": ["/hook/*"]}
    if kind == "twilio_exact":
        return TwilioSignatureMiddleware, {"auth_token": TOKEN, "paths": ["/hook/form"]}
    if kind == "vapi":
        return VapiWebhookMiddleware, {"secret": SECRET, "paths": ["/hook/*"]}
    if kind == "ratelimit":
        options = {
            "rate": 100.0,
            "burst": 100,
            "exempt": ["/hook/*"],
            "routes": {"/items/{item_id}": (0.5, 1)},
            "key": client_key,
            "clock": ManualClock(1000.0),
        }
        return RateLimitMiddleware, options
    registry = REGISTRIES.setdefault((framework, shape), CollectorRegistry())
    return MetricsMiddleware, {"registry": registry}


def mounted(framework: str, inner: Any) -> Any:
    if framework == "fastapi":
        outer = FastAPI()
        outer.mount(PREFIX, inner)
        return outer
    return Starlette(routes=[Mount(PREFIX, app=inner)])


@contextmanager
def run(shape: str, framework: str, app: Any) -> Iterator[str]:
    if shape == "plain":
        server = serve_sync(app)
    elif shape == "mounted":
        server = serve_sync(mounted(framework, app))
    elif shape == "uvicorn_root":
        server = serve_sync(app, root_path=PREFIX)
    else:
        server = serve_hypercorn_sync(app, root_path=PREFIX)
    with server as url:
        yield url


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[str, str, str], str]]:
    with ExitStack() as stack:

        class Lazy(dict[tuple[str, str, str], str]):
            def __missing__(self, key: tuple[str, str, str]) -> str:
                kind, framework, shape = key
                if kind == "litestar_define":
                    app = litestar_with_define_middleware()
                else:
                    factory, options = middleware(kind, framework, shape)
                    app = build(framework, factory, **options)
                self[key] = stack.enter_context(run(shape, framework, app))
                return self[key]

        yield Lazy()


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=SHAPES)
def shape(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def post(url: str, headers: dict[str, str], body: bytes = BODY) -> Any:
    async with http_client() as client:
        return await client.post(url, content=body, headers=headers)


# Servers percent-decode `path` before any router sees it: %2F is a "/" there, %68 an "h".
SPELLINGS = (
    "/hook/form",
    "//hook/form",
    "/hook//form",
    "/hook/form/",
    "//hook//form//",
    "/hook%2Fform",
    "/%68ook/form",
)


async def test_twilio_guard_in_every_shape(
    servers: dict[tuple[str, str, str], str], framework: str, shape: str
) -> None:
    reach, genuine, signed = REACH[shape]
    for kind in ("twilio", "twilio_exact"):
        url = servers[kind, framework, shape]
        good = sign(f"{url}{signed}/hook/form", PAIRS)
        response = await post(f"{url}{genuine}/hook/form", FORM | {"x-twilio-signature": good})
        assert (kind, response.status_code) == (kind, 200), response.text
        assert sorted(tuple(p) for p in response.json()) == sorted(PAIRS)
        forged = sign(f"{url}{signed}/hook/form", PAIRS, secret="not-the-token-000000000000000")
        for prefix in reach:
            for spelling in SPELLINGS:
                target = f"{url}{prefix}{spelling}"
                for headers in (FORM, FORM | {"x-twilio-signature": forged}):
                    response = await post(target, headers)
                    assert (kind, target, response.status_code) == (kind, target, 403)


async def test_vapi_guard_in_every_shape(
    servers: dict[tuple[str, str, str], str], framework: str, shape: str
) -> None:
    reach, genuine, _ = REACH[shape]
    url = servers["vapi", framework, shape]
    response = await post(f"{url}{genuine}/hook/raw", {"x-vapi-secret": SECRET}, b"{}")
    assert (response.status_code, response.content) == (200, b"{}")
    for prefix in reach:
        for spelling in ("/hook/raw", "//hook/raw", "/hook//raw/"):
            target = f"{url}{prefix}{spelling}"
            for headers in ({}, {"x-vapi-secret": "forged"}):
                response = await post(target, headers, b"{}")
                assert (target, response.status_code) == (target, 403)


async def test_rate_limit_exempt_and_route_limits_in_every_shape(
    servers: dict[tuple[str, str, str], str], framework: str, shape: str, anyio_backend: str
) -> None:
    reach, _, _ = REACH[shape]
    url = servers["ratelimit", framework, shape]
    async with http_client() as client:
        for prefix in reach:
            headers = {"x-client": f"{anyio_backend}{prefix}"}  # buckets of this test only
            exempt = await client.get(f"{url}{prefix}/hook/get", headers=headers)
            assert (exempt.status_code, "ratelimit" in exempt.headers) == (200, False)
            first = await client.get(f"{url}{prefix}/items/1", headers=headers)
            assert first.status_code == 200
            assert first.headers["ratelimit-policy"] == '"default";q=1;w=2'
            for spelling in ("/items/2", "/items/2/", "//items//2"):  # one route, one bucket
                limited = await client.get(f"{url}{prefix}{spelling}", headers=headers)
                assert (spelling, limited.status_code) == (spelling, 429)
            default = await client.get(f"{url}{prefix}/cid", headers=headers)
            assert default.headers["ratelimit-policy"] == '"default";q=100;w=1'


async def test_metrics_route_labels_in_every_shape(
    servers: dict[tuple[str, str, str], str], framework: str, shape: str
) -> None:
    reach, _, _ = REACH[shape]
    url = servers["metrics", framework, shape]
    registry = REGISTRIES[framework, shape]

    def count(route: str) -> float:
        labels = {"method": "GET", "route": route, "status_class": "2xx"}
        value = registry.get_sample_value("resilient_voice_http_server_requests_total", labels)
        return value or 0.0

    async with http_client() as client:
        for prefix in reach:
            # Starlette's own Mount (/api) cannot route hypercorn's path without the prefix:
            # it prepends its path to root_path and expects `path` to start with that.
            mount = not (framework == "starlette" and shape == "hypercorn_root" and not prefix)
            before = count("/items/{item_id}"), count("/api/things/{thing_id}")
            assert (await client.get(f"{url}{prefix}/items/7")).status_code == 200
            if mount:
                assert (await client.get(f"{url}{prefix}/api/things/9")).status_code == 200
            expected = (before[0] + 1, before[1] + mount)
            await eventually(
                lambda e=expected: (count("/items/{item_id}"), count("/api/things/{thing_id}")) == e
            )


def litestar_with_define_middleware() -> Any:
    """The other Litestar placement docs/asgi.md shows: the guard runs after routing."""
    return Litestar(
        [_ls_form, _ls_raw, _ls_text],
        middleware=[
            DefineMiddleware(
                TwilioSignatureMiddleware,  # type: ignore[arg-type]
                auth_token=TOKEN,
                paths=["/hook/form"],
            )
        ],
        debug=False,
        logging_config=None,
    )


@pytest.mark.parametrize("litestar_shape", ["plain", "mounted", "uvicorn_root", "hypercorn_root"])
async def test_litestar_define_middleware_guards_every_spelling(
    servers: dict[tuple[str, str, str], str], litestar_shape: str
) -> None:
    reach, genuine, signed = REACH[litestar_shape]
    url = servers["litestar_define", "litestar", litestar_shape]
    good = sign(f"{url}{signed}/hook/form", PAIRS)
    response = await post(f"{url}{genuine}/hook/form", FORM | {"x-twilio-signature": good})
    assert response.status_code == 200, response.text
    for prefix in reach:
        for spelling in SPELLINGS:
            response = await post(f"{url}{prefix}{spelling}", FORM)
            assert (prefix, spelling, response.status_code) == (prefix, spelling, 403)


# Direct ASGI calls: scopes as servers and frameworks fill them, and scopes none should.


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/twilio/status", "", ("/twilio/status",)),
        ("//twilio//status/", "", ("/twilio/status",)),
        ("twilio/status", "", ("/twilio/status",)),
        ("/", "", ("/",)),
        ("", "", ("/",)),
        ("/hooks/twilio/status", "/hooks", ("/twilio/status",)),  # uvicorn, Mount
        ("/twilio/status", "/hooks", ("/twilio/status",)),  # hypercorn
        ("/hooks", "/hooks", ("/",)),
        ("/hooks//twilio/status", "/hooks", ("/twilio/status",)),
        ("/hooks/hooks/x", "/hooks", ("/hooks/x",)),
        # Starlette routes the whole path, Litestar what follows the first "/hooks": both.
        ("/hookstwilio/status", "/hooks", ("/hookstwilio/status", "/twilio/status")),
        ("/x/hooks/twilio/status", "/hooks", ("/x/hooks/twilio/status", "/twilio/status")),
        ("/hooks/twilio/status", "/hooks/", ("/hooks/twilio/status", "/twilio/status")),
        (None, "", ()),
        (b"/twilio/status", "", ()),
        ("/twilio/status", None, ()),
    ],
)
def test_route_paths(path: Any, root_path: Any, expected: tuple[str, ...]) -> None:
    assert route_paths({"type": "http", "path": path, "root_path": root_path}) == expected


def test_route_paths_after_litestar_routed_takes_the_path_as_routed() -> None:
    scope = {"path": "/hooks/status", "root_path": "/hooks", "route_handler": object()}
    assert route_paths(scope) == ("/hooks/status",)
    assert route_paths({"path": "/a"}) == ("/a",)  # no root_path at all


@pytest.mark.parametrize(
    ("paths", "path", "guarded"),
    [
        (["/twilio/*"], "/twilio", True),
        (["/twilio/*"], "/twilio/status", True),
        (["/twilio/*"], "/twilios", False),
        (["/twilio/status/"], "/twilio/status", True),
        (["/twilio//status"], "/twilio/status", True),
        (["/*"], "/", True),
        (["/tw*"], "/twilio", True),
    ],
)
def test_path_matcher_compares_normalised_paths(paths: list[str], path: str, guarded: bool) -> None:
    assert PathMatcher(paths)(normalise_path(path)) is guarded


async def call(app: Any, scope: dict[str, Any]) -> tuple[int, list[str]]:
    events: list[str] = []
    status = 0

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        events.append("app")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    app.app = inner
    await app(scope, receive, send)
    return status, events


def odd_scope(**overrides: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/open",
        "raw_path": b"/open",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    for name, value in overrides.items():
        if value is _MISSING:
            del scope[name]
        else:
            scope[name] = value
    return scope


_MISSING = object()
# Scopes no server should produce, or where frameworks disagree on the route: a guard cannot
# tell that the request is off its paths, so it verifies.
ODD_SCOPES = {
    "no path": {"path": _MISSING, "raw_path": b"/hook/form"},
    "path None": {"path": None, "raw_path": b"/hook/form"},
    "path bytes": {"path": b"/hook/form", "raw_path": b"/hook/form"},
    "root_path None": {"path": "/hook/form", "root_path": None, "raw_path": b"/hook/form"},
    "no leading slash": {"path": "hook/form", "raw_path": b"hook/form"},
    "root inside path": {"path": "/x/hooks/hook/form", "root_path": "/hooks"},
    "root glued to path": {"path": "/hookshook/form", "root_path": "/hooks"},
}


@pytest.mark.parametrize("case", sorted(ODD_SCOPES))
async def test_guards_fail_closed_on_scopes_they_cannot_place(case: str) -> None:
    scope = odd_scope(**ODD_SCOPES[case])
    twilio = TwilioSignatureMiddleware(_unused, TOKEN, paths=["/hook/*"])
    vapi = VapiWebhookMiddleware(_unused, secret=SECRET, paths=["/hook/*"])
    assert await call(twilio, dict(scope)) == (403, [])
    assert await call(vapi, dict(scope)) == (403, [])
    # Verified, not refused: a genuine request still gets through.
    vapi_scope = dict(scope, headers=[(b"x-vapi-secret", SECRET.encode())])
    assert await call(vapi, vapi_scope) == (200, ["app"])


async def test_twilio_guard_verifies_a_scope_without_path_from_its_raw_path() -> None:
    url = "http://127.0.0.1:8000/hook/form"
    headers = [(b"host", b"127.0.0.1:8000"), (b"x-twilio-signature", sign(url, []).encode())]
    twilio = TwilioSignatureMiddleware(_unused, TOKEN, paths=["/hook/*"])
    scope = odd_scope(path=_MISSING, raw_path=b"/hook/form", headers=headers)
    assert await call(twilio, scope) == (200, ["app"])


@pytest.mark.parametrize("case", sorted(ODD_SCOPES))
async def test_rate_limit_and_metrics_survive_odd_scopes(case: str) -> None:
    limiter = RateLimitMiddleware(
        _unused, rate=1.0, exempt=["/hook/*"], routes={"/items/{x}": 1.0}, clock=ManualClock()
    )
    assert await call(limiter, odd_scope(**ODD_SCOPES[case])) == (200, ["app"])
    if case in ("no path", "path None", "path bytes", "root_path None"):
        # Nowhere to place it: not exempt, the default limit.
        assert (await call(limiter, odd_scope(**ODD_SCOPES[case])))[0] == 429
    metrics = MetricsMiddleware(_unused, registry=CollectorRegistry())
    assert await call(metrics, odd_scope(**ODD_SCOPES[case])) == (200, ["app"])


async def test_rate_limit_exempts_only_what_every_framework_routes_to_an_exempt_path() -> None:
    limiter = RateLimitMiddleware(_unused, rate=1.0, exempt=["/hook/*"], clock=ManualClock())
    # Litestar would route this to /hook/form, Starlette to /x/hooks/hook/form: limited.
    scope = odd_scope(path="/x/hooks/hook/form", root_path="/hooks")
    assert (await call(limiter, dict(scope)))[0] == 200
    assert (await call(limiter, dict(scope)))[0] == 429
    exempt = odd_scope(path="/hooks/hook/form", root_path="/hooks")
    for _ in range(3):
        assert (await call(limiter, dict(exempt)))[0] == 200


async def test_per_route_limit_applies_when_either_reading_matches() -> None:
    limiter = RateLimitMiddleware(
        _unused, rate=None, routes={"/calls/{sid}/transfer": 1.0}, clock=ManualClock()
    )
    scope = odd_scope(path="/x/hooks/calls/1/transfer/", root_path="/hooks")
    assert (await call(limiter, dict(scope)))[0] == 200
    assert (await call(limiter, dict(scope)))[0] == 429


async def _unused(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("replaced in call()")


# The route template matcher: linear, and the same answers as the regular expressions it
# replaced wherever those were well defined.


@pytest.mark.parametrize(
    "pattern",
    ["/{a:path}/x/{b:path}", "/files/{a:path}/{b:path}", "/f{a:path}", "/{a:path}.json"],
)
def test_route_templates_with_ambiguous_path_parameters_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"\{name:path\}"):
        RouteMatcher(pattern)


@pytest.mark.parametrize("pattern", ["/a/{b", "/a/b}", "/a/{b}}/c", "/a/{1}"])
def test_malformed_route_templates_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        RouteMatcher(pattern)


def test_route_matcher_on_hostile_paths() -> None:
    # Under the regular expression these took polynomial time; now one pass each.
    assert not RouteMatcher("/{a}-{b}-{c}.json")("/" + "-" * 20_000)
    assert not RouteMatcher("/x/{p:path}/y/{s}.json")("/x" + "/y" * 20_000)
    assert RouteMatcher("/x/{p:path}/y/{s}")("/x" + "/y" * 20_000 + "/z")


def _reference(pattern: str) -> re.Pattern[str]:
    """The matcher before: one regular expression per template."""
    parts: list[str] = []
    position = 0
    for match in re.finditer(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}", pattern):
        parts.append(re.escape(pattern[position : match.start()]))
        parts.append(".+" if match.group().endswith(":path}") else "[^/]+")
        position = match.end()
    parts.append(re.escape(pattern[position:]))
    return re.compile("".join(parts))


_SEGMENTS = st.sampled_from(["a", "b", "{x}", "{y}.json", "a-{x}-{y}", "{x}{y}", "{x}-b"])


@settings(max_examples=300, deadline=None)
@given(
    head=st.lists(_SEGMENTS, max_size=3),
    rest=st.booleans(),
    tail=st.lists(_SEGMENTS, max_size=2),
    path=st.text(alphabet="ab/-.json", max_size=16),
)
def test_route_matcher_agrees_with_the_regular_expression(
    head: list[str], rest: bool, tail: list[str], path: str
) -> None:
    segments = [*head, "{p:path}", *tail] if rest else head
    pattern = "/" + "/".join(segments)
    path = normalise_path(path)
    expected = _reference(pattern).fullmatch(path) is not None
    assert RouteMatcher(pattern)(path) is expected


# Refusals before routing are labelled with the route they were aimed at.


def refusing_stack(app: Any, *, registry: CollectorRegistry) -> Any:
    """Metrics outermost, then a rate limit, then the Vapi check: refusals happen before routing."""
    guarded = VapiWebhookMiddleware(app, secret=SECRET, paths=["/hook/*"])
    limited = RateLimitMiddleware(
        guarded, rate=None, routes={"/items/*": (0.5, 1), "/api/*": (0.5, 1)}, key=client_key
    )
    return MetricsMiddleware(limited, registry=registry)


@pytest.fixture(scope="module")
def refusing() -> Iterator[dict[str, tuple[str, CollectorRegistry]]]:
    with ExitStack() as stack:

        class Lazy(dict[str, tuple[str, CollectorRegistry]]):
            def __missing__(self, framework: str) -> tuple[str, CollectorRegistry]:
                registry = CollectorRegistry()
                app = build(framework, refusing_stack, registry=registry)
                self[framework] = stack.enter_context(serve_sync(app)), registry
                return self[framework]

        yield Lazy()


async def test_refusals_are_labelled_with_the_route_they_were_aimed_at(
    refusing: dict[str, tuple[str, CollectorRegistry]], framework: str, anyio_backend: str
) -> None:
    url, registry = refusing[framework]

    def count(method: str, route: str, status_class: str) -> float:
        labels = {"method": method, "route": route, "status_class": status_class}
        value = registry.get_sample_value("resilient_voice_http_server_requests_total", labels)
        return value or 0.0

    expected = [
        ("POST", "/hook/raw", "4xx"),
        ("GET", "/items/{item_id}", "2xx"),
        ("GET", "/items/{item_id}", "4xx"),
        ("GET", "/api/things/{thing_id}", "4xx"),
        ("POST", "__unmatched__", "4xx"),
    ]

    def refused(method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        value = registry.get_sample_value("resilient_voice_http_server_refusals_total", labels)
        return value or 0.0

    # The same refusals by status: the webhook guard's 403 apart from the rate limiter's 429.
    refusals = [
        ("POST", "/hook/raw", "403"),
        ("GET", "/items/{item_id}", "429"),
        ("GET", "/api/things/{thing_id}", "429"),
        ("POST", "__unmatched__", "403"),
    ]
    before = [count(*labels) for labels in expected]
    before_refused = [refused(*labels) for labels in refusals]
    headers = {"x-client": f"refusals-{anyio_backend}"}
    async with http_client(base_url=url, headers=headers) as client:
        assert (await client.post("/hook/raw", content=b"{}")).status_code == 403
        assert (await client.get("/items/1")).status_code == 200
        assert (await client.get("/items/2")).status_code == 429
        assert (await client.get("/api/things/1")).status_code == 200
        assert (await client.get("/api/things/2")).status_code == 429
        # A refusal aimed at no route stays unmatched: labels remain bounded by the routes.
        assert (await client.post("/hook/no-such-route", content=b"{}")).status_code == 403
    await eventually(
        lambda: (
            [count(*labels) - b for labels, b in zip(expected, before, strict=True)]
            == [1.0] * len(expected)
        )
    )
    await eventually(
        lambda: (
            [refused(*labels) - b for labels, b in zip(refusals, before_refused, strict=True)]
            == [1.0] * len(refusals)
        )
    )
    assert refused("GET", "/items/{item_id}", "403") == 0.0


async def test_the_route_a_refusal_was_aimed_at_is_resolved_once_per_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route as StarletteRoute

    from resilient_voice.asgi import _metrics

    resolved: list[str] = []
    resolve = _metrics._aimed_at

    def counting(router: Any, scope: Any) -> str | None:
        resolved.append(scope["path"])
        return resolve(router, scope)

    monkeypatch.setattr(_metrics, "_aimed_at", counting)
    monkeypatch.setattr(_metrics, "_AIMED_AT_CACHE", 2)

    async def hook(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[StarletteRoute("/hook/{name}", hook, methods=["POST"])])
    registry = CollectorRegistry()
    stack = MetricsMiddleware(VapiWebhookMiddleware(app, secret=SECRET), registry=registry)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stack), base_url="http://app.test"
    ) as client:
        for path in ["/hook/a", "/hook/a", "/hook/a", "/hook/b", "/hook/c", "/hook/a"]:
            assert (await client.post(path, content=b"{}")).status_code == 403
    # /hook/a once; b and c fill the cache of two, which is emptied; then /hook/a again.
    assert resolved == ["/hook/a", "/hook/b", "/hook/c", "/hook/a"]
    labels = {"method": "POST", "route": "/hook/{name}", "status": "403"}
    assert registry.get_sample_value("resilient_voice_http_server_refusals_total", labels) == 6
