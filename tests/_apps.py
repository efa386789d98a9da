"""The same small app in Starlette, FastAPI and Litestar, with one middleware installed.

Routes (identical in all three):

- ``POST /hook/form``: the form as the framework parsed it, ``[[name, value], ...]`` as JSON;
- ``POST /hook/raw`` and ``POST /open``: the raw body echoed;
- ``GET /hook/get``, ``GET /items/{item_id}``, ``GET /api/things/{thing_id}``: plain text;
- ``GET /stream``: two chunks, the second only after ``STREAM_GATE`` is set;
- ``GET /boom``: raises;
- ``GET|POST /cid`` and ``POST /hook/cid``: the current correlation id (``-`` when none), after
  logging one record on ``LOG``;
- ``GET /dup``: sets ``X-Correlation-ID: app-set`` itself;
- ``GET /outgoing?to=URL``: GETs ``URL`` with httpx (an event hook adds the current correlation
  id as ``X-Correlation-ID``, as ``ResilientTransport`` does) and returns the answer's body.

Starlette and FastAPI install the middleware through their own ``middleware`` mechanism; Litestar
is wrapped at the ASGI level (its ``middleware=`` runs after routing, so 404s would not be seen).

``serve_sync`` runs ``resilient_voice.testing.serve`` from synchronous code (module-scoped
fixtures shared by both anyio backends), through a blocking portal; ``serve_hypercorn_sync``
does the same with hypercorn, whose scopes differ (``path`` excludes ``root_path``).
"""

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio.to_thread
import httpx
from anyio.from_thread import start_blocking_portal
from fastapi import APIRouter, FastAPI
from fastapi import Request as FastAPIRequest
from litestar import Litestar, Router, get, post, route
from litestar import Request as LitestarRequest
from litestar import Response as LitestarResponse
from litestar.response import Stream
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from resilient_voice.correlation import get_correlation_id
from resilient_voice.testing import serve

FRAMEWORKS = ("starlette", "fastapi", "litestar")
STREAM_GATE = threading.Event()


async def _chunks() -> AsyncIterator[bytes]:
    yield b"first\n"
    # Bounded: a buffering middleware makes the client time out first, and the test fails.
    await anyio.to_thread.run_sync(STREAM_GATE.wait, 3.0)
    yield b"second\n"


async def _form(request: Request) -> Response:
    form = await request.form()
    return JSONResponse([[k, v] for k, v in form.multi_items()])


async def _raw(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def _text(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _stream(request: Request) -> Response:
    return StreamingResponse(_chunks(), media_type="text/plain")


async def _boom(request: Request) -> Response:
    raise RuntimeError("boom")


LOG = logging.getLogger("resilient_voice.tests.app")


async def _cid_text() -> str:
    LOG.info("handled")
    return get_correlation_id() or "-"


async def _outgoing_text(to: str) -> str:
    async def add_correlation_id(request: httpx.Request) -> None:
        cid = get_correlation_id()
        if cid is not None:
            request.headers["x-correlation-id"] = cid

    hooks = {"request": [add_correlation_id]}
    async with httpx.AsyncClient(event_hooks=hooks, trust_env=False, timeout=5.0) as client:
        return (await client.get(to)).text


async def _cid(request: Request) -> Response:
    return PlainTextResponse(await _cid_text())


async def _dup(request: Request) -> Response:
    return PlainTextResponse("dup", headers={"X-Correlation-ID": "app-set"})


async def _outgoing(request: Request) -> Response:
    return PlainTextResponse(await _outgoing_text(request.query_params["to"]))


def _starlette_routes() -> list[Any]:
    return [
        Route("/cid", _cid, methods=["GET", "POST"]),
        Route("/hook/cid", _cid, methods=["POST"]),
        Route("/dup", _dup),
        Route("/outgoing", _outgoing),
    ]


def starlette_app(middleware: type[Any], extra_routes: list[Any], **options: Any) -> Any:
    routes = [
        Route("/hook/form", _form, methods=["POST"]),
        Route("/hook/raw", _raw, methods=["POST"]),
        Route("/open", _raw, methods=["POST"]),
        Route("/hook/get", _text),
        Route("/items/{item_id}", _text),
        Mount("/api", routes=[Route("/things/{thing_id}", _text)]),
        Route("/stream", _stream),
        Route("/boom", _boom),
        *_starlette_routes(),
        *extra_routes,
    ]
    return Starlette(routes=routes, middleware=[Middleware(middleware, **options)])


def fastapi_app(middleware: type[Any], extra_routes: list[Any], **options: Any) -> Any:
    app = FastAPI()
    app.add_api_route("/hook/form", _form, methods=["POST"])
    app.add_api_route("/hook/raw", _raw, methods=["POST"])
    app.add_api_route("/open", _raw, methods=["POST"])
    app.add_api_route("/hook/get", _text)
    app.add_api_route("/items/{item_id}", _text)
    api = APIRouter(prefix="/api")

    @api.get("/things/{thing_id}")
    async def thing(request: FastAPIRequest) -> Response:
        return PlainTextResponse("ok")

    app.include_router(api)
    app.add_api_route("/stream", _stream)
    app.add_api_route("/boom", _boom)
    app.add_api_route("/cid", _cid, methods=["GET", "POST"])
    app.add_api_route("/hook/cid", _cid, methods=["POST"])
    app.add_api_route("/dup", _dup)
    app.add_api_route("/outgoing", _outgoing)
    for extra in extra_routes:
        app.router.routes.append(extra)
    app.add_middleware(middleware, **options)
    return app


@post("/hook/form", status_code=200)
async def _ls_form(request: LitestarRequest[Any, Any, Any]) -> LitestarResponse[bytes]:
    form = await request.form()
    body = json.dumps([[k, v] for k, v in form.multi_items()]).encode()
    return LitestarResponse(body, media_type="application/json")


@post(["/hook/raw", "/open"], status_code=200)
async def _ls_raw(request: LitestarRequest[Any, Any, Any]) -> LitestarResponse[bytes]:
    return LitestarResponse(await request.body(), media_type="application/octet-stream")


@get(["/hook/get", "/items/{item_id:str}"], media_type="text/plain")
async def _ls_text() -> str:
    return "ok"


@get("/things/{thing_id:str}", media_type="text/plain")
async def _ls_thing() -> str:
    return "ok"


@get("/stream")
async def _ls_stream() -> Stream:
    return Stream(_chunks(), media_type="text/plain")


@get("/boom")
async def _ls_boom() -> None:
    raise RuntimeError("boom")


@route(["/cid"], http_method=["GET", "POST"], media_type="text/plain", status_code=200)
async def _ls_cid() -> str:
    return await _cid_text()


@post("/hook/cid", media_type="text/plain", status_code=200)
async def _ls_hook_cid() -> str:
    return await _cid_text()


@get("/dup", media_type="text/plain")
async def _ls_dup() -> LitestarResponse[str]:
    return LitestarResponse("dup", headers={"X-Correlation-ID": "app-set"})


@get("/outgoing", media_type="text/plain")
async def _ls_outgoing(request: LitestarRequest[Any, Any, Any]) -> str:
    return await _outgoing_text(request.query_params["to"])


def litestar_app(middleware: type[Any], extra_routes: list[Any], **options: Any) -> Any:
    app = Litestar(
        route_handlers=[
            _ls_form,
            _ls_raw,
            _ls_text,
            Router("/api", route_handlers=[_ls_thing]),
            _ls_stream,
            _ls_boom,
            _ls_cid,
            _ls_hook_cid,
            _ls_dup,
            _ls_outgoing,
            *extra_routes,
        ],
        debug=False,
        logging_config=None,
    )
    return middleware(app, **options)


BUILDERS = {"starlette": starlette_app, "fastapi": fastapi_app, "litestar": litestar_app}


def build(
    framework: str, middleware: type[Any], extra_routes: list[Any] = (), **options: Any
) -> Any:  # type: ignore[assignment]
    return BUILDERS[framework](middleware, list(extra_routes), **options)


@contextmanager
def serve_sync(app: Any, **options: Any) -> Iterator[str]:
    """``resilient_voice.testing.serve`` for synchronous callers: yield the base URL."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve(app, **options)) as url,
    ):
        yield url


@contextmanager
def serve_hypercorn_sync(app: Any, *, root_path: str = "") -> Iterator[str]:
    """Serve ``app`` with hypercorn (asyncio) on loopback in a thread; yield the base URL."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    with socket.socket() as probe:  # a free port; hypercorn binds it again right away
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.root_path = root_path
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        try:
            loop.run_until_complete(hypercorn_serve(app, config, shutdown_trigger=stop.wait))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name=f"hypercorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("hypercorn did not start") from None
            time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10.0)


_SSL = ssl.create_default_context()  # building one per client costs ~0.1 s


def http_client(**options: Any) -> httpx.AsyncClient:
    """An httpx client for loopback servers that reuses one SSL context."""
    options.setdefault("timeout", 5.0)
    return httpx.AsyncClient(verify=_SSL, trust_env=False, **options)


def answering(status: int, body: bytes) -> Callable[..., Awaitable[None]]:
    """A tiny upstream that answers every request with ``status`` and the JSON ``body``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def leased_clients(
    transport: Any, clock: Any, leases: Any, *, sid: str, token: str, vapi_key: str
) -> tuple[Any, Any]:
    """A TwilioClient and a VapiClient on one in-process upstream, sharing one lease set."""
    from resilient_voice.twilio import TwilioClient
    from resilient_voice.vapi import VapiClient

    twilio = TwilioClient(
        sid,
        token,
        base_url="http://127.0.0.1",
        transport=transport,
        clock=clock,
        calls_per_second=1000.0,
        leases=leases,
    )
    vapi = VapiClient(
        vapi_key,
        base_url="http://127.0.0.1",
        transport=transport,
        clock=clock,
        leases=leases,
        server_url_configured=True,
    )
    return twilio, vapi


class LateCreate(httpx.AsyncBaseTransport):
    """Holds back the first call create and tells the client it timed out; the test hands it to
    the fake later (:meth:`deliver`): a request the provider processes after the client gave up
    on it, and after a reconciliation that listed no call for it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self._held: list[httpx.Request] = []
        self._done = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        create = request.method == "POST" and request.url.path.endswith(("/Calls.json", "/call"))
        if create and not self._done:
            self._done = True
            await request.aread()
            self._held.append(request)
            raise httpx.ReadTimeout("timed out", request=request)
        return await self._inner.handle_async_request(request)

    async def deliver(self) -> None:
        response = await self._inner.handle_async_request(self._held.pop())
        await response.aread()
        assert response.status_code == 201, response.status_code
