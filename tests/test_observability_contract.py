"""The dashboard and the alert rules read metrics that exist: a renamed metric breaks the build.

One test drives every primitive (breaker through open, limiter wait and refusal, keyed limiter,
retry scheduled / given up / outcome unknown, the transport with a 429, a shared breaker's fleet
view and a store outage) and each middleware (metrics, correlation, rate limit 429, webhook
guard 403) once, with a :class:`PrometheusMetrics` and a :class:`MetricsMiddleware` on a fresh
registry, scrapes the exposition and checks every metric name and label that the PromQL of
docs/observability/grafana-dashboard.json and docs/observability/alerts.yml use. The PromQL is
read with a small tokenizer (below), enough for the expressions those files hold: selectors,
matchers, ``by (...)`` groupings, range selectors and function calls.

Real time, bounded: two replicas of a shared breaker see each other within a fleet tick (1 s;
5 s allowed), the second follows the first open within two ticks (5 s allowed), and a dead store
is noticed within its 0.05 s timeout (5 s allowed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route as StarletteRoute

from _redis import COREDIS_CANCEL_LEAK, REDIS_URL, collect_coredis_garbage, free_port, fresh_prefix
from resilient_voice import (
    CircuitBreaker,
    CircuitOpenError,
    KeyedLimiter,
    OutcomeUnknownError,
    Policy,
    ResilientTransport,
    RetryPolicy,
    TokenBucket,
)
from resilient_voice.asgi import (
    CorrelationIdMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    VapiWebhookMiddleware,
)
from resilient_voice.events import (
    ConcurrencyBlocked,
    Event,
    FleetStateChanged,
    StoreAvailabilityChanged,
)
from resilient_voice.http import Route
from resilient_voice.metrics import PrometheusMetrics
from resilient_voice.redis import RedisBackend
from resilient_voice.testing import ManualClock

pytestmark = COREDIS_CANCEL_LEAK
__all__ = ["collect_coredis_garbage"]  # an autouse fixture, used by being here

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "docs" / "observability"
DASHBOARD = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
RULES = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
PAGE = (ROOT / "docs" / "observability.md").read_text()

# Labels Prometheus adds when it scrapes (``job``, ``instance``) or that name the series itself.
SCRAPE_LABELS = frozenset({"job", "instance", "__name__"})


# PromQL, as far as these files use it.

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset"}
)
_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*")
      |(?P<range>\[[^\]]*\])
      |(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
      |(?P<var>\$\w+)
      |(?P<other>.)""",
    re.X | re.S,
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [
        (m.lastgroup or "", m.group()) for m in _TOKEN.finditer(expr) if not m.group().isspace()
    ]


class Query:
    """Metric names, their matchers' labels, and grouping labels of one PromQL expression."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.metrics: dict[str, set[str]] = {}  # name -> labels its matchers use
        self.grouping: set[str] = set()  # labels of by (...) / without (...) / on (...)
        tokens = _tokens(expr)
        i = 0
        while i < len(tokens):
            kind, text = tokens[i]
            following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            if kind == "name" and text in _KEYWORDS:
                if following == "(":
                    i, labels = _label_list(tokens, i + 2)
                    self.grouping |= labels
                    continue
            elif kind == "name" and (following == "(" or following in ("by", "without")):
                pass  # a function, or an aggregation (sum by (...) (...))
            elif kind == "name":
                labels: set[str] = set()
                if following == "{":
                    i, labels = _matchers(tokens, i + 2)
                    i -= 1
                self.metrics.setdefault(text, set()).update(labels)
            elif text == "{":  # a selector without a metric name: {__name__=~"..."}
                i, _ = _matchers(tokens, i + 1)
                continue
            i += 1


def _label_list(tokens: list[tuple[str, str]], i: int) -> tuple[int, set[str]]:
    labels = set()
    while tokens[i][1] != ")":
        if tokens[i][0] == "name":
            labels.add(tokens[i][1])
        i += 1
    return i + 1, labels


def _matchers(tokens: list[tuple[str, str]], i: int) -> tuple[int, set[str]]:
    labels = set()
    while tokens[i][1] != "}":
        if tokens[i][0] == "name":
            labels.add(tokens[i][1])
        i += 1
    return i + 1, labels


def test_the_promql_reader() -> None:
    query = Query(
        'histogram_quantile(0.99, sum by (job, route, le) (rate(a_bucket{job=~"$job", '
        'state="open"}[$__rate_interval]))) / ignoring (x) b_total > 0 and on (y) c'
    )
    assert query.metrics == {"a_bucket": {"job", "state"}, "b_total": set(), "c": set()}
    assert query.grouping == {"job", "route", "le", "x", "y"}
    assert Query('count({__name__=~"rv_.+"})').metrics == {}


def _dashboard_exprs() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    return [
        target["expr"]
        for panel in panels(DASHBOARD["panels"])
        for target in panel.get("targets", [])
    ]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in RULES["groups"] for rule in group["rules"]]


QUERIES = [("dashboard", expr) for expr in _dashboard_exprs()] + [
    (rule["alert"], rule["expr"]) for rule in _rules()
]


# The exposition after driving everything once.


async def _boom() -> None:
    raise ConnectionError("down")


async def _drive_outbound(metrics: PrometheusMetrics) -> None:
    breaker = CircuitBreaker("upstream", failure_threshold=1, listeners=[metrics])

    async def fine() -> str:
        return "ok"

    assert await breaker.call(fine) == "ok"
    with pytest.raises(ConnectionError):
        await breaker.call(_boom)
    with pytest.raises(CircuitOpenError):
        await breaker.call(fine)

    clock = ManualClock(autojump=True)  # the second grant waits one interval, in no real time
    cps = TokenBucket(200, 1, name="cps", clock=clock, listeners=[metrics])
    await cps.acquire()
    await cps.acquire()  # waits 5 ms for its token
    assert not await cps.try_acquire()
    keyed = KeyedLimiter(1, name="per-client", clock=clock, listeners=[metrics])
    assert await keyed.try_acquire("client")
    assert not await keyed.try_acquire("client")

    answers = {"/busy": [429, 201], "/full": [429, 429], "/broken": [500]}

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(answers[request.url.path].pop(0), json={})

    retry = RetryPolicy(max_attempts=2, base_delay=0.001, name="create_call", listeners=[metrics])
    transport = ResilientTransport(
        Policy(retry=retry, breaker=CircuitBreaker("twilio", listeners=[metrics])),
        transport=httpx.MockTransport(upstream),
        routes=[
            Route("create_call", host="api.example.com", unprocessed_statuses=frozenset({429}))
        ],
        name="twilio",
        listeners=[metrics],
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as c:
        assert (await c.post("/busy")).status_code == 201  # one 429 retried, then created
        assert (await c.post("/full")).status_code == 429  # pushed back twice: given up
        with pytest.raises(OutcomeUnknownError):
            await c.post("/broken")  # a create that may have happened


async def _drive_shared_store(metrics: PrometheusMetrics) -> None:
    seen: list[Event] = []
    prefix = fresh_prefix()
    async with (
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as one,
        RedisBackend.from_url(REDIS_URL, prefix=prefix, timeout=1.0) as other,
    ):
        # Two replicas of one breaker; the second follows when more than 40 % are open.
        tripping = CircuitBreaker("fleet", failure_threshold=1, store=one)
        follower = CircuitBreaker(
            "fleet", fleet_quorum=0.4, store=other, listeners=[metrics, seen.append]
        )
        with anyio.fail_after(5):
            while (fleet := follower.statistics().fleet) is None or fleet.live < 2:
                await anyio.sleep(0.05)
        with pytest.raises(ConnectionError):
            await tripping.call(_boom)
        with anyio.fail_after(5):  # a tick to publish, a tick to read
            while not any(isinstance(e, FleetStateChanged) for e in seen):
                await anyio.sleep(0.05)
    seen.clear()
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with RedisBackend.from_url(dead, prefix=fresh_prefix(), timeout=0.05) as backend:
        lonely = CircuitBreaker("lonely", store=backend, listeners=[metrics, seen.append])
        paced = TokenBucket(10, name="shared-cps", store=backend, listeners=[metrics])
        await paced.acquire()  # Redis is gone: the local fallback grants
        with anyio.fail_after(5):
            while not any(isinstance(e, StoreAvailabilityChanged) for e in seen):
                await anyio.sleep(0.05)
        del lonely


async def _drive_inbound(registry: CollectorRegistry) -> None:
    async def hook(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            StarletteRoute("/vapi/events", hook, methods=["POST"]),
            StarletteRoute("/api/items/{item}", hook),
        ]
    )
    guarded = VapiWebhookMiddleware(app, secret="s3cret", paths=["/vapi/*"])
    limited = RateLimitMiddleware(guarded, rate=0.001, burst=2, exempt=["/vapi/*"])
    stack = MetricsMiddleware(CorrelationIdMiddleware(limited), registry=registry)
    transport = httpx.ASGITransport(app=stack)
    async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
        ok = await client.post("/vapi/events", json={}, headers={"X-Vapi-Secret": "s3cret"})
        assert ok.status_code == 200
        assert "x-correlation-id" in ok.headers
        assert (await client.post("/vapi/events", json={})).status_code == 403
        statuses = [(await client.get("/api/items/7")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def exposition(request: pytest.FixtureRequest) -> dict[str, set[str]]:
    """Sample name -> its label names, after driving everything once on each anyio backend."""
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)

    async def drive() -> None:
        await _drive_outbound(metrics)
        await _drive_shared_store(metrics)
        await _drive_inbound(registry)
        # A provider's "no free call slot" answer needs a provider client and a fault of its
        # own; its record is what the clients send (tests/test_vapi.py drives them for real).
        metrics(ConcurrencyBlocked("vapi", "refused"))

    anyio.run(drive, backend=request.param)
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_metric_and_label_the_dashboard_and_rules_read_is_exposed(
    exposition: dict[str, set[str]],
) -> None:
    problems = []
    for where, expr in QUERIES:
        query = Query(expr)
        if not query.metrics:
            problems.append(f"{where}: no metric found in {expr!r}")
        for name, matcher_labels in query.metrics.items():
            if name not in exposition:
                problems.append(f"{where}: {name} is not in the exposition")
            elif missing := matcher_labels - SCRAPE_LABELS - exposition[name]:
                problems.append(f"{where}: {name} has no label {sorted(missing)}")
        # Every grouping label exists on at least one metric the query reads.
        known = set().union(*(exposition.get(name, set()) for name in query.metrics))
        if missing := query.grouping - known - SCRAPE_LABELS:
            problems.append(f"{where}: no metric of {expr!r} has {sorted(missing)}")
    assert problems == []


def test_the_new_series_carry_what_operators_filter_on(exposition: dict[str, set[str]]) -> None:
    assert exposition["resilient_voice_http_client_backpressure_total"] >= {"outcome", "route"}
    assert exposition["resilient_voice_http_server_refusals_total"] == {"method", "route", "status"}
    assert exposition["resilient_voice_store_available"] == {"primitive", "name"}
    assert exposition["resilient_voice_breaker_fleet_failure_rate"] == {"breaker"}


def test_alert_annotations_use_only_the_labels_the_rule_keeps() -> None:
    for rule in _rules():
        kept = Query(rule["expr"]).grouping
        text = " ".join(rule["annotations"].values())
        used = set(re.findall(r"\$labels\.(\w+)", text))
        assert used <= kept, (rule["alert"], used - kept)


def _anchors(markdown: str) -> set[str]:
    """The ids mkdocs' toc gives the headings (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.M):
        if "{#" in heading:
            anchors.add(heading.split("{#", 1)[1].rstrip("} "))
            continue
        slug = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        anchors.add(re.sub(r"[-\s]+", "-", slug))
    return anchors


def test_every_alert_has_a_severity_annotations_and_a_runbook_section() -> None:
    anchors = _anchors(PAGE)
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), rule["alert"]
        page, anchor = annotations["runbook_url"].split("#")
        assert page == "docs/observability.md"
        assert anchor in anchors, (rule["alert"], anchor)
        assert f"`{rule['alert']}`" in PAGE, rule["alert"]


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    assert DASHBOARD["schemaVersion"] >= 39
    assert DASHBOARD["uid"]
    assert DASHBOARD["title"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_the_page_documents_every_metric_the_files_use() -> None:
    for _, expr in QUERIES:
        for name in Query(expr).metrics:
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert f"`{base}`" in PAGE, name
