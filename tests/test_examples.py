"""The examples in examples/ run for real against FakeTelephony on loopback.

The framework apps are served with ``serve()`` and driven with httpx, Twilio's status callbacks
included (sent and signed by the fake, or signed here with the twilio package's
``RequestValidator``). The scripts are imported and their ``main()`` awaited with fast settings.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from twilio.request_validator import RequestValidator

from resilient_voice.testing import FakeTelephony, Fault, serve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SID = "AC" + "e" * 32
TOKEN = "example-auth-token"
VAPI_SECRET = "example-vapi-secret"
CALLER = "+15005550006"


def load(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    module_name = f"example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A port to give the app before it starts: its public URL is in its settings."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sign(url: str, form: dict[str, str], token: str = TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, form))


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    with anyio.fail_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await anyio.sleep(0.02)


class Running:
    """A fake Twilio and an example app, both served on loopback."""

    def __init__(self, fake: FakeTelephony, http: httpx.AsyncClient, registry: Any) -> None:
        self.fake = fake
        self.http = http
        self.registry = registry
        self.base = str(http.base_url).rstrip("/")


async def run_app(framework: str, **settings: Any) -> AsyncIterator[Running]:
    module = load(f"{framework}_app")
    fake = FakeTelephony(twilio_accounts={SID: TOKEN}, calls_per_second=1000.0, call_duration=0.05)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with serve(fake) as fake_url:
        options: dict[str, Any] = {
            "twilio_account_sid": SID,
            "twilio_auth_token": TOKEN,
            "public_base_url": base,
            "caller_id": CALLER,
            "twilio_base_url": fake_url,
            "calls_per_second": 1000.0,
            **settings,
        }
        if framework == "fastapi":
            options.setdefault("vapi_webhook_secret", VAPI_SECRET)
        registry = CollectorRegistry()
        app = module.create_app(module.Settings(**options), registry=registry)
        async with (
            serve(app, port=port),
            httpx.AsyncClient(base_url=base, trust_env=False, timeout=10.0) as http,
        ):
            yield Running(fake, http, registry)


FRAMEWORKS = ("fastapi", "starlette", "litestar")
# The apps run under uvicorn's asyncio loop in their own thread; the test's backend would only
# change the HTTP client driving them, so these tests run once.
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture(params=FRAMEWORKS)
async def voice_app(request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    async for running in run_app(request.param):
        yield running


async def place(app: Running, to: str) -> httpx.Response:
    return await app.http.post("/calls", json={"to": to})


@ASYNCIO_ONLY
async def test_app_places_a_call_and_takes_its_signed_callbacks(
    voice_app: Running,
) -> None:
    app = voice_app
    response = await place(app, "+15550100001")
    assert response.status_code == 201, response.text
    placed = response.json()
    assert placed["sid"].startswith("CA")
    cid = response.headers["x-correlation-id"]

    # The fake sends the call's status callbacks, signed with the account's token, to the
    # URL the app gave; the app verifies them and records what they say.
    async def completed() -> Any:
        state = (await app.http.get(f"/attempts/{placed['attempt_id']}")).json()
        return state if state["status"] == "completed" else None

    state = await eventually(completed)
    assert state["sid"] == placed["sid"]
    assert state["correlation_id"] == cid  # the id of POST /calls, back with the callback
    callbacks = app.fake.callbacks("status-callback")
    assert callbacks
    assert {c.response_status for c in callbacks} == {204}
    (request,) = app.fake.requests("twilio.calls.create")
    assert request.headers["x-correlation-id"] == cid


@ASYNCIO_ONLY
async def test_app_twilio_callbacks_need_twilio_signature(voice_app: Running) -> None:
    app = voice_app
    form = {"CallSid": "CA" + "1" * 32, "CallStatus": "ringing"}
    url = f"{app.base}/twilio/status?rv_attempt=a1"
    signed = await app.http.post(url, data=form, headers={"X-Twilio-Signature": sign(url, form)})
    assert signed.status_code == 204
    forged = await app.http.post(
        url, data=form, headers={"X-Twilio-Signature": sign(url, form, "not-the-token")}
    )
    assert forged.status_code == 403
    unsigned = await app.http.post(url, data=form)
    assert unsigned.status_code == 403
    state = (await app.http.get("/attempts/a1")).json()
    assert state["status"] == "ringing"


@ASYNCIO_ONLY
async def test_app_lost_response_is_202_with_the_attempt_id_and_never_resent(
    voice_app: Running,
) -> None:
    app = voice_app
    app.fake.faults = [Fault.drop_after(count=1, endpoints="twilio.calls.create")]
    response = await place(app, "+15550100002")
    assert response.status_code == 202
    attempt_id = response.json()["attempt_id"]
    assert response.json()["status"] == "outcome_unknown"
    assert len(app.fake.requests("twilio.calls.create")) == 1
    (created,) = app.fake.calls("twilio")
    # The call's own callback names the attempt: the app can tell it was placed.
    state = await eventually(_json_with_sid(app, attempt_id))
    assert state["sid"] == created.id


def _json_with_sid(app: Running, attempt_id: str) -> Callable[[], Any]:
    async def check() -> Any:
        state = (await app.http.get(f"/attempts/{attempt_id}")).json()
        return state if state["sid"] else None

    return check


@ASYNCIO_ONLY
async def test_app_invalid_number_is_422_and_nothing_is_sent(voice_app: Running) -> None:
    app = voice_app
    response = await place(app, "555-0100")
    assert response.status_code == 422
    assert response.json()["field"] == "to"
    assert app.fake.requests("twilio.calls.create") == []


@ASYNCIO_ONLY
async def test_app_open_breaker_is_503_with_retry_after(voice_app: Running) -> None:
    app = voice_app
    app.fake.faults = [Fault.outage(0.0, 3600.0, endpoints="twilio.calls.create")]
    # A 503 after sending may have been processed: three unknown outcomes trip the breaker.
    for n in range(3):
        assert (await place(app, f"+1555010010{n}")).status_code == 202
    refused = await place(app, "+15550100109")
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert len(app.fake.requests("twilio.calls.create")) == 3  # the 4th never left


@ASYNCIO_ONLY
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_app_pacing_beyond_the_budget_is_429_with_retry_after(framework: str) -> None:
    async for app in run_app(framework, calls_per_second=0.05, call_budget=1.0):
        assert (await place(app, "+15550100201")).status_code == 201
        paced = await place(app, "+15550100202")  # the next slot is 20 s away
        assert paced.status_code == 429
        assert int(paced.headers["retry-after"]) >= 1
        assert len(app.fake.requests("twilio.calls.create")) == 1


@ASYNCIO_ONLY
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_app_inbound_limit_spares_the_webhooks(framework: str) -> None:
    async for app in run_app(framework, inbound_rate=0.01, inbound_burst=2):
        responses = [await place(app, f"+1555010030{n}") for n in range(3)]
        assert [r.status_code for r in responses] == [201, 201, 429]
        assert int(responses[2].headers["retry-after"]) >= 1
        assert responses[2].headers["x-correlation-id"]  # rejections carry an id too
        form = {"CallSid": "CA" + "2" * 32, "CallStatus": "completed"}
        url = f"{app.base}/twilio/status"
        for _ in range(3):  # exempt: a 429 would lose the event
            hook = await app.http.post(
                url, data=form, headers={"X-Twilio-Signature": sign(url, form)}
            )
            assert hook.status_code == 204


@ASYNCIO_ONLY
async def test_fastapi_vapi_webhooks_need_the_secret_and_are_never_limited() -> None:
    async for app in run_app("fastapi", inbound_rate=0.01, inbound_burst=1):
        event = {"message": {"type": "status-update"}}
        for _ in range(3):
            vapi = await app.http.post(
                "/vapi/events", json=event, headers={"X-Vapi-Secret": VAPI_SECRET}
            )
            assert vapi.status_code == 200
        forged = await app.http.post("/vapi/events", json=event, headers={"X-Vapi-Secret": "no"})
        assert forged.status_code == 403


@ASYNCIO_ONLY
async def test_app_metrics(voice_app: Running) -> None:
    app = voice_app
    assert (await place(app, "+15550100401")).status_code == 201
    text = (await app.http.get("/metrics")).text
    assert 'resilient_voice_http_server_requests_total{method="POST",route="/calls"' in text
    assert f'resilient_voice_breaker_state{{breaker="twilio:{SID}",state="closed"}} 1.0' in text
    assert "resilient_voice_http_client_requests_total" in text


async def test_twilio_sdk_example_never_resends_a_lost_create() -> None:
    outcome = await load("twilio_sdk").main(calls_per_second=1000.0, retry_after=0.05)
    assert outcome.calls == {"+15550100001": 1, "+15550100002": 1, "+15550100003": 1}
    # The 429 was retried (never processed); the lost response was not re-sent.
    assert outcome.requests == {"+15550100001": 1, "+15550100002": 2, "+15550100003": 1}


@pytest.mark.parametrize("seed", [3, 11])
async def test_paced_worker_example_keeps_the_pace_and_calls_nobody_twice(seed: int) -> None:
    summary = await load("paced_worker").main(calls=40, cps=200.0, concurrency=6, seed=seed)
    assert summary.duplicates == {}
    assert summary.cps_violations == 0
    assert summary.placed + len(summary.failed) + len(summary.unknown) == 40
    assert summary.unknown  # the fault script loses some responses
    assert summary.reconciled_placed + len(summary.to_retry) == len(summary.unknown)
    assert summary.upstream_calls == summary.placed + summary.reconciled_placed
    assert summary.seconds >= 39 / 200.0  # paced, not a burst


def test_vapi_sdk_example_never_resends_a_lost_create() -> None:
    """One test, one backend: the SDK spends seconds building its models on first use."""
    posts, created = anyio.run(load("vapi_sdk").main)
    assert posts == 2
    assert created == {"+14155550100": 1, "+14155550101": 1}


@pytest.mark.slow
def test_scripts_run_from_a_checkout() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "paced_worker.py"), "--calls", "20", "--cps", "200"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "duplicates:              none" in result.stdout
    assert "CPS violations:          0" in result.stdout


@pytest.mark.slow
def test_fastapi_example_serves_from_the_command_line() -> None:
    """``python examples/fastapi_app.py --port N``: a fake Twilio and the app, ready to curl."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "fastapi_app.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    http.get("/metrics")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the example did not start"
                    assert process.poll() is None, process.communicate()[0]
                    time.sleep(0.05)
            response = http.post("/calls", json={"to": "+15550100001"})
            # The example's fake loses one response in ten: 202 with the attempt id then.
            assert response.status_code in (201, 202), response.text
            assert response.json()["attempt_id"]
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=15)[0]
    assert "fake Twilio at http://127.0.0.1:" in output
    assert f"curl -si -X POST http://127.0.0.1:{port}/calls" in output  # what to try, printed


@pytest.mark.parametrize("name", ["fastapi_app", "starlette_app", "litestar_app"])
def test_server_examples_print_the_requests_to_try(name: str) -> None:
    lines = load(name).requests_to_try("http://127.0.0.1:8000")
    assert "curl -si -X POST http://127.0.0.1:8000/calls" in lines
    assert "curl -s http://127.0.0.1:8000/metrics" in lines
