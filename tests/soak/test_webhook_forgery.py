"""Webhook forgery suite: forged Twilio and Vapi webhooks are refused, genuine ones accepted.

Hypothesis draws the webhooks (random paths, queries, form parameters with unicode and repeated
keys, JSON bodies); each one is sent genuine, in every variant Twilio and Vapi document, and then
forged in every way listed in ``TWILIO_FORGERIES`` and ``VAPI_FORGERIES``, through the real guards
in front of a small app, driven over ASGI by httpx's ``ASGITransport``. A few cases go through a
real uvicorn with real proxy headers (``test_through_uvicorn``).

Twilio's verdicts are also checked against the twilio package's ``RequestValidator`` as the
oracle: every genuine request must validate there (so the variant is one Twilio really signs),
and every forgery of the URL, the parameters or the body must fail there too (so it is a real
forgery, not a mistake of the test). The guard must agree.

Two things the signature cannot detect are counted on their own lines, accepted by the oracle
and by the guard alike: a repeated ``name=value`` pair (Twilio's signature de-duplicates values;
``strict=True`` refuses it) and a replay of a genuine request (Twilio's signature carries no
timestamp and no nonce). docs/security.md says so.

The size: ``--soak-size short`` (CI) draws ``SHORT`` webhooks per provider and backend,
``full`` draws ``FULL``; the figures are printed at the end of the module, one line per category
with its accepted and refused counts (``-s`` is not needed: they go to the terminal reporter).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twilio.request_validator import HMAC_SHA256, RequestValidator

from resilient_voice.asgi import TrustedProxies, TwilioSignatureMiddleware, VapiWebhookMiddleware
from resilient_voice.testing import serve

SHORT = 12
FULL = 300

TOKEN = "0123456789abcdef0123456789abcdef"
ROTATED = "fedcba9876543210fedcba9876543210"
WRONG = "00000000000000000000000000000000"
KEY_ID = "webhooks_sharedkey_1"
SHARED = "shared-key-secret-0123456789"
PUBLIC_HOST = "hooks.example.com"
OTHER_HOST = "other.example.com"
ATTACKER = ("203.0.113.7", 40000)
PROXY = ("10.1.2.3", 40000)

VAPI_SECRET = "vapi-secret-0123456789"
VAPI_BEARER = "vapi-bearer-0123456789"
VAPI_HMAC = "vapi-hmac-key-0123456789"
TOLERANCE = 300.0
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z

FORM = "application/x-www-form-urlencoded"

Tally = Counter[tuple[str, str, str, str]]


def draw(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same on every run (the figures are reproducible)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Counts per (provider, kind, category, verdict); printed when the module finishes."""
    counts: Tally = Counter()
    yield counts
    if not counts:
        return
    size = request.config.getoption("--soak-size")
    lines = ["", f"webhook forgery suite ({size}): accepted / refused per category"]
    for provider, kind, category in sorted({key[:3] for key in counts}):
        accepted = counts[provider, kind, category, "accepted"]
        refused = counts[provider, kind, category, "refused"]
        lines.append(
            f"  {provider:7} {kind:8} {category:44} accepted {accepted:6}  refused {refused:6}"
        )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


@pytest.fixture
def count(soak_size: str) -> int:
    return FULL if soak_size == "full" else SHORT


# The app behind the guards: it records every request that reached it.


@dataclass
class Sent:
    """One request as a client sends it: the guard it goes to and every byte that matters."""

    guard: str
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    client: tuple[str, int] = ATTACKER
    root_path: str = ""


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body", False):
            pass
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def twilio_guards(app: Recorder) -> dict[str, Any]:
    common: dict[str, Any] = {"auth_token": [TOKEN, ROTATED], "shared_keys": {KEY_ID: SHARED}}
    return {
        "twilio": TwilioSignatureMiddleware(app, **common),
        "twilio-strict": TwilioSignatureMiddleware(app, strict=True, **common),
        "twilio-proxied": TwilioSignatureMiddleware(app, trusted_proxies=["10.0.0.0/8"], **common),
    }


def vapi_guards(app: Recorder, clock: Callable[[], float]) -> dict[str, Any]:
    guards: dict[str, Any] = {
        "vapi-secret": VapiWebhookMiddleware(app, secret=VAPI_SECRET),
        "vapi-secret-2025": VapiWebhookMiddleware(
            app, secret=VAPI_SECRET, secret_header="X-Vapi-Signature"
        ),
        "vapi-bearer": VapiWebhookMiddleware(app, bearer_token=VAPI_BEARER),
        "vapi-bearer-custom": VapiWebhookMiddleware(
            app, bearer_token=VAPI_BEARER, bearer_header="X-Api-Key", bearer_prefix=False
        ),
    }
    for algorithm in ("sha256", "sha512", "sha1"):
        for encoding in ("hex", "base64"):
            guards[f"vapi-hmac-{algorithm}-{encoding}"] = VapiWebhookMiddleware(
                app,
                hmac_secret=VAPI_HMAC,
                algorithm=algorithm,
                signature_encoding=encoding,
                tolerance=TOLERANCE,
                clock=clock,
            )
    return guards


async def deliver(guards: dict[str, Any], app: Recorder, sent: Sent) -> bool:
    """Send ``sent``; ``True`` when the app handled it, ``False`` when the guard refused it."""
    transport = httpx.ASGITransport(
        app=guards[sent.guard], client=sent.client, root_path=sent.root_path
    )
    before = app.calls
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.request(
            sent.method, sent.url, headers=sent.headers, content=sent.body
        )
    reached = app.calls - before
    if response.status_code == 200 and reached == 1:
        return True
    assert (response.status_code, reached) == (403, 0), (response.status_code, response.text)
    assert response.json() == {"error": "forbidden"}
    return False


# Twilio: what Twilio signs, as the twilio package computes it.


class Multi(dict[str, list[str]]):
    """A multi-dict the validator reads repeated keys from (``getall``)."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def multi(pairs: list[tuple[str, str]]) -> Multi:
    params = Multi()
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def sign(url: str, params: list[tuple[str, str]] | None, secret: str = TOKEN, **kw: Any) -> str:
    return str(RequestValidator(secret).compute_signature(url, multi(params or []), **kw))


def oracle(url: str, params: list[tuple[str, str]] | str, signature: str, **kw: Any) -> bool:
    """The twilio package's verdict on the request as the server received it."""
    secret = kw.pop("secret", TOKEN)
    payload = params if isinstance(params, str) else multi(params)
    return bool(RequestValidator(secret).validate(url, payload, signature, **kw))


@dataclass(frozen=True)
class TwilioHook:
    """A webhook as Twilio would send it to ``https://hooks.example.com<path>?<query>``."""

    kind: str  # "form" (POST), "get" (parameters in the query) or "json" (bodySHA256)
    scheme: str
    path: str
    query: list[tuple[str, str]]
    params: list[tuple[str, str]]
    document: Any
    space_as_plus: bool

    @property
    def body(self) -> bytes:
        if self.kind == "form":
            quoting = quote if not self.space_as_plus else None
            encoded = (
                urlencode(self.params, quote_via=quoting) if quoting else urlencode(self.params)
            )
            return encoded.encode("ascii")
        if self.kind == "json":
            return json.dumps(self.document, ensure_ascii=False).encode("utf-8")
        return b""

    @property
    def query_string(self) -> str:
        pairs = list(self.query)
        if self.kind == "get":
            pairs += self.params
        text = urlencode(pairs)
        if self.kind == "json":
            digest = hashlib.sha256(self.body).hexdigest()
            text = f"{text}&bodySHA256={digest}" if text else f"bodySHA256={digest}"
        return text

    @property
    def target(self) -> str:
        """Path and query as they travel on the wire."""
        query = self.query_string
        return f"{self.path}?{query}" if query else self.path

    def url(self, host: str = PUBLIC_HOST, scheme: str | None = None) -> str:
        return f"{scheme or self.scheme}://{host}{self.target}"

    @property
    def signed_params(self) -> list[tuple[str, str]]:
        """What the validator gets as ``params``: the form, nothing for GET and JSON."""
        return self.params if self.kind == "form" else []

    def oracle_params(self, body: bytes | None = None) -> list[tuple[str, str]] | str:
        body = self.body if body is None else body
        if self.kind == "json":
            return body.decode("utf-8")
        if self.kind == "get" or not body:
            return []
        return parse_qsl(body.decode("ascii"), keep_blank_values=True)

    def headers(self, signature: str, host: str = PUBLIC_HOST) -> list[tuple[str, str]]:
        headers = [("Host", host), ("X-Twilio-Signature", signature)]
        if self.kind == "form":
            headers.append(("Content-Type", FORM))
        elif self.kind == "json":
            headers.append(("Content-Type", "application/json"))
        return headers

    @property
    def method(self) -> str:
        return "GET" if self.kind == "get" else "POST"

    def sent(self, signature: str, *, host: str = PUBLIC_HOST, guard: str = "twilio") -> Sent:
        return Sent(guard, self.method, self.url(host), self.headers(signature, host), self.body)


_NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10
) | st.sampled_from(["CallSid", "From", "To", "Digits", "CallStatus", "SpeechResult", "Body"])
_VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
_SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=1, max_size=8)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | _VALUE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_VALUE, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def twilio_hooks(draw_: st.DrawFn) -> TwilioHook:
    kind = draw_(st.sampled_from(["form", "form", "get", "json"]))
    segments = draw_(st.lists(_SEGMENT | _VALUE.filter(bool), min_size=1, max_size=3))
    path = "/" + "/".join(quote(segment, safe="") for segment in segments)
    if draw_(st.booleans()):
        path += "/"
    params = draw_(st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=8))
    if draw_(st.booleans()):  # a repeated key, as StatusCallbackEvent or MediaUrl are
        name = params[0][0]
        params.append((name, draw_(_VALUE.filter(lambda v: (name, v) not in params))))
    return TwilioHook(
        kind=kind,
        scheme=draw_(st.sampled_from(["https", "https", "http"])),
        path=path,
        query=draw_(st.lists(st.tuples(_SEGMENT, _VALUE), max_size=3)),
        params=params,
        document={"message": draw_(_JSON)} if kind == "json" else None,
        space_as_plus=draw_(st.booleans()),
    )


def default_port(scheme: str) -> str:
    return "443" if scheme == "https" else "80"


def twilio_genuine(hook: TwilioHook) -> Iterator[tuple[str, Sent, bool]]:
    """Every documented way a genuine webhook arrives: (category, request, oracle verdict)."""
    params = hook.signed_params
    url = hook.url()
    signature = sign(url, params)
    yield f"{hook.kind}", hook.sent(signature), oracle(url, hook.oracle_params(), signature)
    if hook.kind == "form" and len(set(hook.params)) == len(hook.params):
        # Strict mode refuses a repeated pair by design (docs/security.md), so only forms
        # without one are genuine for it.
        yield "form, strict guard", replace(hook.sent(signature), guard="twilio-strict"), True
    # Twilio's own signing is inconsistent about default ports: the SDK checks both.
    with_port = f"{PUBLIC_HOST}:{default_port(hook.scheme)}"
    yield (
        "default port in Host only",
        hook.sent(signature, host=with_port),
        oracle(hook.url(with_port), hook.oracle_params(), signature),
    )
    signed_with_port = sign(hook.url(with_port), params)
    yield (
        "default port in signature only",
        hook.sent(signed_with_port),
        oracle(url, hook.oracle_params(), signed_with_port),
    )
    custom = f"{PUBLIC_HOST}:8443"
    signed_custom = sign(hook.url(custom), params)
    yield (
        "non-default port in both",
        hook.sent(signed_custom, host=custom),
        oracle(hook.url(custom), hook.oracle_params(), signed_custom),
    )
    rotated = sign(url, params, secret=ROTATED)
    yield (
        "second token (rotation)",
        hook.sent(rotated),
        oracle(url, hook.oracle_params(), rotated, secret=ROTATED),
    )
    shared = sign(url, params, secret=SHARED, algorithm=HMAC_SHA256)
    settings_header = (
        "X-Twilio-Webhooks-Signature-Settings",
        f"key={KEY_ID},algorithm=HMAC_SHA256",
    )
    sent = hook.sent(shared)
    yield (
        "SharedKey HMAC_SHA256",
        replace(sent, headers=[*sent.headers, settings_header]),
        oracle(url, hook.oracle_params(), shared, secret=SHARED, algorithm=HMAC_SHA256),
    )
    sent = hook.sent(signature)
    upper = [(name.upper(), value) for name, value in sent.headers]
    yield "header names in another case", replace(sent, headers=upper), True
    # Behind a trusted proxy: the app sees http://internal:8000, Twilio signed the public URL.
    proxied = [
        ("Host", "internal:8000"),
        *[(n, v) for n, v in sent.headers if n != "Host"],
        ("X-Forwarded-Proto", hook.scheme),
        ("X-Forwarded-Host", PUBLIC_HOST),
    ]
    yield (
        "trusted proxy X-Forwarded-Proto/Host",
        Sent(
            "twilio-proxied",
            hook.method,
            f"http://internal:8000{hook.target}",
            proxied,
            hook.body,
            client=PROXY,
        ),
        True,
    )
    # Mounted under a root path the proxy strips: Twilio signed /api/..., the app sees /...
    mounted_url = f"{hook.scheme}://{PUBLIC_HOST}/api{hook.target}"
    mounted = sign(mounted_url, params)
    yield (
        "mounted under root_path",
        replace(hook.sent(mounted), root_path="/api"),
        oracle(mounted_url, hook.oracle_params(), mounted),
    )


def _flip_case(text: str) -> str:
    flipped = text.swapcase()
    return flipped if flipped != text else text[:-1] + ("A" if text[-1] != "A" else "B")


def twilio_forgeries(hook: TwilioHook, rng: Any) -> Iterator[tuple[str, Sent, bool | None]]:
    """Forgeries of ``hook``: (category, request, oracle verdict or ``None`` when not a URL+params
    question the SDK can answer)."""
    params = hook.signed_params
    url = hook.url()
    genuine = sign(url, params)

    wrong = sign(url, params, secret=WRONG)
    yield "re-signed with a wrong token", hook.sent(wrong), oracle(url, hook.oracle_params(), wrong)
    shared_wrong = sign(url, params, secret=WRONG, algorithm=HMAC_SHA256)
    settings_header = (
        "X-Twilio-Webhooks-Signature-Settings",
        f"key={KEY_ID},algorithm=HMAC_SHA256",
    )
    sent = hook.sent(shared_wrong)
    yield "SharedKey, wrong secret", replace(sent, headers=[*sent.headers, settings_header]), None
    sent = hook.sent(genuine)
    unknown = ("X-Twilio-Webhooks-Signature-Settings", "key=someone_else,algorithm=HMAC_SHA256")
    yield (
        "SharedKey header added, unknown key",
        replace(sent, headers=[*sent.headers, unknown]),
        None,
    )
    yield (
        "SharedKey header added, Auth Token signature",
        replace(sent, headers=[*sent.headers, settings_header]),
        None,
    )
    # The URL: signed for one, sent to another.
    other_host = sign(hook.url(OTHER_HOST), params)
    yield "URL: other host", hook.sent(other_host), oracle(url, hook.oracle_params(), other_host)
    other_path = sign(url.replace(hook.path, hook.path + "x", 1), params)
    yield "URL: other path", hook.sent(other_path), oracle(url, hook.oracle_params(), other_path)
    other_scheme = "http" if hook.scheme == "https" else "https"
    swapped = sign(hook.url(scheme=other_scheme), params)
    yield "URL: other scheme", hook.sent(swapped), oracle(url, hook.oracle_params(), swapped)
    custom = sign(hook.url(f"{PUBLIC_HOST}:8443"), params)
    yield (
        "URL: non-default port removed",
        hook.sent(custom),
        oracle(url, hook.oracle_params(), custom),
    )
    yield (
        "URL: non-default port changed",
        hook.sent(custom, host=f"{PUBLIC_HOST}:9443"),
        oracle(hook.url(f"{PUBLIC_HOST}:9443"), hook.oracle_params(), custom),
    )
    tail = "&" if "?" in hook.target else "?"
    sent = hook.sent(genuine)
    query_added = replace(sent, url=sent.url + tail + "x=1")
    yield (
        "URL: query parameter added",
        query_added,
        oracle(query_added.url, hook.oracle_params(), genuine),
    )
    if hook.query_string and hook.kind != "json":
        shorter = (
            hook.url().rsplit("&", 1)[0] if "&" in hook.query_string else hook.url().split("?")[0]
        )
        yield (
            "URL: query changed",
            replace(sent, url=shorter),
            oracle(shorter, hook.oracle_params(), genuine),
        )
    if hook.kind == "get":
        changed = replace(hook, params=[(n, v + "x") for n, v in hook.params])
        yield "URL: query value changed", changed.sent(genuine), oracle(changed.url(), [], genuine)
    # The parameters of a form.
    if hook.kind == "form":
        for tamper, pairs in _tampered_pairs(hook.params):
            body = urlencode(pairs).encode("ascii")
            verdict = oracle(url, pairs, genuine)
            # e.g. one of two identical pairs removed: the signed string is the same.
            category = f"BY DESIGN: {tamper}, same signed string" if verdict else tamper
            yield category, replace(sent, body=body), verdict
        repeated = [*hook.params, hook.params[0]]
        body = urlencode(repeated).encode("ascii")
        yield (
            "BY DESIGN: pair repeated (form)",
            replace(sent, body=body),
            oracle(url, repeated, genuine),
        )
        yield "pair repeated, strict guard", replace(sent, body=body, guard="twilio-strict"), None
        # A raw byte changed anywhere in the body: forged unless it re-encodes to the same form.
        raw = bytearray(hook.body)
        position = rng.randrange(len(raw))
        raw[position] = rng.choice([b for b in b"aZ09%+=&;-_." if b != raw[position]])
        tampered = bytes(raw)
        try:
            verdict: bool | None = oracle(url, hook.oracle_params(tampered), genuine)
        except UnicodeDecodeError:
            verdict = False
        category = "body byte changed (form)" if not verdict else "BY DESIGN: equivalent form"
        yield category, replace(sent, body=tampered), verdict
        # A character moved from a value to the end of its name: the concatenation is the same
        # unless the sort order changes, so the oracle decides which it is.
        name, value = next((p for p in hook.params if p[1]), (hook.params[0][0], ""))
        if value:
            shifted = [
                (name + value[0], value[1:]) if p == (name, value) else p for p in hook.params
            ]
            verdict = oracle(url, shifted, genuine)
            category = "BY DESIGN: boundary moved" if verdict else "name/value boundary moved"
            body = urlencode(shifted).encode("ascii")
            yield category, replace(sent, body=body), verdict
        yield "form sent as a GET", replace(sent, method="GET", body=b""), None
        yield "form body dropped", replace(sent, body=b""), oracle(url, [], genuine)
    if hook.kind == "json":
        tampered = hook.body + b" "
        yield (
            "body tampered (JSON)",
            replace(sent, body=tampered),
            oracle(url, tampered.decode("utf-8"), genuine),
        )
        # The attacker fixes bodySHA256 too: the URL no longer matches the signature.
        new_digest = hashlib.sha256(tampered).hexdigest()
        old_digest = hashlib.sha256(hook.body).hexdigest()
        rehashed = sent.url.replace(old_digest, new_digest)
        yield (
            "body tampered (JSON) + bodySHA256 fixed",
            replace(sent, url=rehashed, body=tampered),
            oracle(rehashed, tampered.decode("utf-8"), genuine),
        )
        yield (
            "JSON body as form (bodySHA256 dropped)",
            replace(
                sent,
                url=url.split("?")[0],
                headers=[*hook.headers(genuine)[:2], ("Content-Type", FORM)],
            ),
            None,
        )
    if hook.kind == "get":
        form = urlencode([("Extra", "1")]).encode()
        yield (
            "GET with a form body added",
            replace(
                sent, method="POST", body=form, headers=[*sent.headers, ("Content-Type", FORM)]
            ),
            None,
        )
    # Header smuggling.
    bogus = sign(url + "x", params)
    yield (
        "duplicate signature (genuine first)",
        replace(sent, headers=[*sent.headers, ("X-Twilio-Signature", bogus)]),
        None,
    )
    yield (
        "duplicate signature (forged first)",
        replace(
            sent,
            headers=[
                ("X-Twilio-Signature", bogus),
                *sent.headers,
            ],
        ),
        None,
    )
    yield "signature value case-swapped", hook.sent(_flip_case(genuine)), None
    yield "signature with whitespace", hook.sent(f" {genuine} "), None
    yield "signature folded", hook.sent(genuine[:10] + "\r\n " + genuine[10:]), None
    yield "signature truncated", hook.sent(genuine[:-2] + "="), None
    other = sign(hook.url(OTHER_HOST), params)
    two_hosts = [("Host", OTHER_HOST), *hook.sent(other).headers]
    yield "two Host headers (signed for the first)", replace(sent, headers=two_hosts), None
    two_hosts = [*hook.sent(other).headers, ("Host", OTHER_HOST)]
    yield "two Host headers (signed for the last)", replace(sent, headers=two_hosts), None
    # A webhook Twilio signed for another app (same account) replayed to this one, claiming
    # through X-Forwarded-* that it was addressed to the other app.
    spoofed = [
        *hook.sent(other).headers,
        ("X-Forwarded-Host", OTHER_HOST),
        ("X-Forwarded-Proto", hook.scheme),
    ]
    yield (
        "X-Forwarded-* from an untrusted peer",
        replace(sent, guard="twilio-proxied", headers=spoofed, client=ATTACKER),
        None,
    )
    yield "X-Forwarded-* to a guard trusting none", replace(sent, headers=spoofed), None
    forwarded = [*hook.sent(other).headers, ("Forwarded", f"host={OTHER_HOST};proto={hook.scheme}")]
    yield (
        "Forwarded from an untrusted peer",
        replace(sent, guard="twilio-proxied", headers=forwarded, client=ATTACKER),
        None,
    )
    yield (
        "signature missing",
        replace(sent, headers=[h for h in sent.headers if h[0] != "X-Twilio-Signature"]),
        None,
    )


def _tampered_pairs(pairs: list[tuple[str, str]]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    first_name, first_value = pairs[0]
    yield "parameter added", [*pairs, ("Injected", "1")]
    if len(pairs) > 1:
        yield "parameter removed", pairs[1:]
    yield "parameter value changed", [(first_name, first_value + "1"), *pairs[1:]]
    yield "parameter renamed", [(first_name + "1", first_value), *pairs[1:]]
    yield "key duplicated, other value", [*pairs, (first_name, first_value + "2")]


def record(tally: Tally, provider: str, kind: str, category: str, accepted: bool) -> None:
    tally[provider, kind, category, "accepted" if accepted else "refused"] += 1


async def test_twilio_forgeries_are_refused_and_genuine_webhooks_accepted(
    tally: Tally, count: int
) -> None:
    import random

    app = Recorder()
    guards = twilio_guards(app)
    hooks = draw(twilio_hooks(), count)
    rng = random.Random(19)
    problems: list[str] = []
    for hook in hooks:
        for category, sent, verdict in twilio_genuine(hook):
            assert verdict, f"the oracle refuses a genuine variant: {category} {sent}"
            accepted = await deliver(guards, app, sent)
            record(tally, "Twilio", "genuine", category, accepted)
            if not accepted:
                problems.append(f"genuine refused: {category}: {sent}")
        for category, sent, verdict in twilio_forgeries(hook, rng):
            by_design = category.startswith("BY DESIGN")
            if verdict is not None:
                assert verdict is by_design, f"oracle on {category}: {verdict} {sent}"
            accepted = await deliver(guards, app, sent)
            record(tally, "Twilio", "forged", category, accepted)
            if accepted is not by_design:
                problems.append(
                    f"forged {'refused' if by_design else 'accepted'}: {category}: {sent}"
                )
    assert not problems, "\n".join(problems[:20])


# Vapi: each credential type; HMAC over "{timestamp}.{body}".


@dataclass
class Clock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


def vapi_hmac(
    body: bytes, timestamp: str, algorithm: str, encoding: str, key: str = VAPI_HMAC
) -> str:
    mac = hmac.new(key.encode(), timestamp.encode() + b"." + body, algorithm)
    if encoding == "hex":
        return mac.hexdigest()
    return base64.b64encode(mac.digest()).decode("ascii")


@dataclass(frozen=True)
class VapiHook:
    body: bytes
    skew: float  # seconds between the timestamp and the guard's clock, within the tolerance
    milliseconds: bool
    fraction: bool

    def timestamp(self, offset: float = 0.0) -> str:
        instant = NOW + self.skew + offset
        if self.milliseconds:
            return str(int(instant * 1000))
        return f"{instant:.3f}" if self.fraction else str(int(instant))


@st.composite
def vapi_hooks(draw_: st.DrawFn) -> VapiHook:
    message = {
        "message": {
            "type": draw_(st.sampled_from(["status-update", "end-of-call-report", "tool-calls"])),
            "x": draw_(_JSON),
        }
    }
    return VapiHook(
        body=json.dumps(message, ensure_ascii=draw_(st.booleans())).encode("utf-8"),
        skew=draw_(st.floats(-TOLERANCE + 1, TOLERANCE - 1)),
        milliseconds=draw_(st.booleans()),
        fraction=draw_(st.booleans()),
    )


def post(guard: str, body: bytes, headers: list[tuple[str, str]]) -> Sent:
    return Sent(
        guard,
        "POST",
        f"https://{PUBLIC_HOST}/vapi",
        [("Content-Type", "application/json"), *headers],
        body,
    )


HMAC_GUARDS = [(a, e) for a in ("sha256", "sha512", "sha1") for e in ("hex", "base64")]


def vapi_genuine(hook: VapiHook) -> Iterator[tuple[str, Sent]]:
    body = hook.body
    yield "secret (X-Vapi-Secret)", post("vapi-secret", body, [("X-Vapi-Secret", VAPI_SECRET)])
    yield (
        "secret (X-Vapi-Signature, 2025 docs)",
        post("vapi-secret-2025", body, [("X-Vapi-Signature", VAPI_SECRET)]),
    )
    for scheme in ("Bearer", "bearer", "BEARER"):
        yield (
            f"bearer ({scheme} prefix)",
            post("vapi-bearer", body, [("Authorization", f"{scheme} {VAPI_BEARER}")]),
        )
    yield (
        "bearer, custom header, no prefix",
        post("vapi-bearer-custom", body, [("X-Api-Key", VAPI_BEARER)]),
    )
    timestamp = hook.timestamp()
    for algorithm, encoding in HMAC_GUARDS:
        signature = vapi_hmac(body, timestamp, algorithm, encoding)
        guard = f"vapi-hmac-{algorithm}-{encoding}"
        headers = [("x-timestamp", timestamp)]
        yield (
            f"HMAC {algorithm} {encoding}",
            post(guard, body, [*headers, ("x-signature", signature)]),
        )
        yield (
            f"HMAC {encoding}, {algorithm}= prefix",
            post(guard, body, [*headers, ("x-signature", f"{algorithm}={signature}")]),
        )
        if encoding == "hex":
            yield (
                "HMAC hex in upper case",
                post(guard, body, [*headers, ("x-signature", signature.upper())]),
            )


def vapi_forgeries(hook: VapiHook, clock: Clock) -> Iterator[tuple[str, Sent, Callable[[], None]]]:
    """(category, request, what to do to the clock first)."""
    body = hook.body
    keep = lambda: None  # noqa: E731
    for name, header in (("secret", "X-Vapi-Secret"),):
        yield f"{name}: wrong", post("vapi-secret", body, [(header, VAPI_SECRET + "x")]), keep
        yield f"{name}: prefix only", post("vapi-secret", body, [(header, VAPI_SECRET[:-1])]), keep
        yield (
            f"{name}: case changed",
            post("vapi-secret", body, [(header, VAPI_SECRET.upper())]),
            keep,
        )
        yield (
            f"{name}: in another header",
            post("vapi-secret", body, [("X-Vapi-Signature", VAPI_SECRET)]),
            keep,
        )
        yield (
            f"{name}: as a bearer token",
            post("vapi-secret", body, [("Authorization", f"Bearer {VAPI_SECRET}")]),
            keep,
        )
        yield (
            f"{name}: with whitespace",
            post("vapi-secret", body, [(header, f" {VAPI_SECRET} ")]),
            keep,
        )
        yield f"{name}: empty", post("vapi-secret", body, [(header, "")]), keep
    yield (
        "bearer: wrong token",
        post("vapi-bearer", body, [("Authorization", f"Bearer {VAPI_BEARER}x")]),
        keep,
    )
    yield "bearer: no prefix", post("vapi-bearer", body, [("Authorization", VAPI_BEARER)]), keep
    yield (
        "bearer: Basic scheme",
        post("vapi-bearer", body, [("Authorization", f"Basic {VAPI_BEARER}")]),
        keep,
    )
    yield (
        "bearer: two spaces",
        post("vapi-bearer", body, [("Authorization", f"Bearer  {VAPI_BEARER}")]),
        keep,
    )
    yield (
        "bearer: in X-Vapi-Secret",
        post("vapi-bearer", body, [("X-Vapi-Secret", VAPI_BEARER)]),
        keep,
    )
    yield (
        "bearer: prefix where none expected",
        post("vapi-bearer-custom", body, [("X-Api-Key", f"Bearer {VAPI_BEARER}")]),
        keep,
    )
    yield (
        "bearer: custom header expected, Authorization sent",
        post("vapi-bearer-custom", body, [("Authorization", f"Bearer {VAPI_BEARER}")]),
        keep,
    )
    timestamp = hook.timestamp()
    for algorithm, encoding in HMAC_GUARDS:
        guard = f"vapi-hmac-{algorithm}-{encoding}"
        signature = vapi_hmac(body, timestamp, algorithm, encoding)

        def signed(sig: str, ts: str = timestamp, payload: bytes = body, g: str = guard) -> Sent:
            return post(g, payload, [("x-timestamp", ts), ("x-signature", sig)])

        yield (
            "HMAC: wrong secret",
            signed(vapi_hmac(body, timestamp, algorithm, encoding, key="wrong")),
            keep,
        )
        yield "HMAC: body tampered", signed(signature, payload=body[:-1] + b" }"), keep
        yield "HMAC: body appended", signed(signature, payload=body + b"\n"), keep
        later = hook.timestamp(1.0)
        yield "HMAC: timestamp changed", signed(signature, ts=later), keep
        stale = hook.timestamp(-hook.skew - TOLERANCE - 1.0)
        yield (
            "HMAC: stale timestamp",
            signed(vapi_hmac(body, stale, algorithm, encoding), ts=stale),
            keep,
        )
        future = hook.timestamp(-hook.skew + TOLERANCE + 1.0)
        yield (
            "HMAC: timestamp in the future",
            signed(vapi_hmac(body, future, algorithm, encoding), ts=future),
            keep,
        )

        def later_clock(by: float = hook.skew + TOLERANCE + 1.0) -> None:
            clock.now = NOW + by

        yield "HMAC: genuine, replayed after the tolerance", signed(signature), later_clock
        unit = str(int(float(timestamp) * 1000)) if not hook.milliseconds else timestamp[:-3]
        yield "HMAC: timestamp unit changed", signed(signature, ts=unit), keep
        body_only = hmac.new(VAPI_HMAC.encode(), body, algorithm)
        yield (
            "HMAC: signature over the body only",
            signed(
                body_only.hexdigest()
                if encoding == "hex"
                else base64.b64encode(body_only.digest()).decode("ascii")
            ),
            keep,
        )
        other = "sha1" if algorithm != "sha1" else "sha256"
        yield (
            "HMAC: another algorithm",
            signed(f"{other}=" + vapi_hmac(body, timestamp, other, encoding)),
            keep,
        )
        yield "HMAC: signature truncated", signed(signature[:-4]), keep
        yield "HMAC: timestamp missing", post(guard, body, [("x-signature", signature)]), keep
        yield "HMAC: signature missing", post(guard, body, [("x-timestamp", timestamp)]), keep


async def test_vapi_forgeries_are_refused_and_genuine_webhooks_accepted(
    tally: Tally, count: int
) -> None:
    app = Recorder()
    clock = Clock()
    guards = vapi_guards(app, clock)
    problems: list[str] = []
    for hook in draw(vapi_hooks(), count):
        for category, sent in vapi_genuine(hook):
            clock.now = NOW
            accepted = await deliver(guards, app, sent)
            record(tally, "Vapi", "genuine", category, accepted)
            if not accepted:
                problems.append(f"genuine refused: {category}: {sent}")
        for category, sent, before in vapi_forgeries(hook, clock):
            clock.now = NOW
            before()
            accepted = await deliver(guards, app, sent)
            record(tally, "Vapi", "forged", category, accepted)
            if accepted:
                problems.append(f"forged accepted: {category}: {sent}")
        # A replay inside the tolerance verifies: what the HMAC's window allows by design.
        clock.now = NOW
        timestamp = hook.timestamp()
        replay = post(
            "vapi-hmac-sha256-hex",
            hook.body,
            [
                ("x-timestamp", timestamp),
                ("x-signature", vapi_hmac(hook.body, timestamp, "sha256", "hex")),
            ],
        )
        clock.now = NOW + hook.skew + TOLERANCE / 2
        accepted = await deliver(guards, app, replay)
        record(tally, "Vapi", "forged", "BY DESIGN: replay within tolerance", accepted)
        if not accepted:
            problems.append(f"replay within the tolerance refused: {replay}")
    assert not problems, "\n".join(problems[:20])


# Through a real uvicorn: the scope a real server builds, with real proxy headers.


async def over_the_wire(
    base: str, path: str, headers: list[tuple[str, str]], body: bytes, app: Recorder
) -> bool:
    before = app.calls
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        response = await client.post(base + path, headers=headers, content=body)
    reached = app.calls - before
    if response.status_code == 200 and reached == 1:
        return True
    assert reached == 0, response.status_code
    assert response.status_code in (400, 403), response.status_code
    return False


async def raw_post(
    base: str, target: str, headers: list[tuple[str, str]], body: bytes, app: Recorder
) -> bool:
    """POST with exactly these header lines, over a plain socket."""
    host, port = urlsplit(base).netloc.split(":")
    head = [f"POST {target} HTTP/1.1", *(f"{n}: {v}" for n, v in headers)]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    before = app.calls
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send("\r\n".join(head).encode("utf-8") + body)
        answer = b""
        with anyio.fail_after(10):
            try:
                while True:
                    answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    status = int(answer.split(b" ", 2)[1])
    reached = app.calls - before
    if status == 200 and reached == 1:
        return True
    assert (reached, status in (400, 403)) == (0, True), answer[:200]
    return False


async def test_through_uvicorn(tally: Tally) -> None:
    app = Recorder()
    params = [("CallSid", "CA" + "1" * 32), ("CallStatus", "completed"), ("Caller", "Zoë")]
    body = urlencode(params).encode("ascii")
    public = f"https://{PUBLIC_HOST}/hook?attempt=1"
    signature = sign(public, params)
    form = [("Content-Type", FORM), ("X-Twilio-Signature", signature)]
    proxy = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", PUBLIC_HOST)]
    results: list[tuple[str, str, bool, bool]] = []

    # A proxy on this host (loopback) that sets X-Forwarded-Proto and -Host.
    guard = TwilioSignatureMiddleware(app, auth_token=TOKEN, trusted_proxies=["127.0.0.1"])
    async with serve(guard) as base:
        accepted = await over_the_wire(base, "/hook?attempt=1", [*form, *proxy], body, app)
        results.append(("genuine", "trusted proxy X-Forwarded-*", accepted, True))
        other = sign(f"https://{OTHER_HOST}/hook?attempt=1", params)
        spoofed = [("Content-Type", FORM), ("X-Twilio-Signature", other), *proxy[:1]]
        # The client wrote the first hop; the proxy appended the host it was reached at.
        spoofed.append(("X-Forwarded-Host", f"{OTHER_HOST}, {PUBLIC_HOST}"))
        accepted = await over_the_wire(base, "/hook?attempt=1", spoofed, body, app)
        results.append(("forged", "client-written X-Forwarded-Host hop", accepted, False))
        headers = [*form, *proxy, ("X-Twilio-Signature", other)]
        accepted = await over_the_wire(base, "/hook?attempt=1", headers, body, app)
        results.append(("forged", "duplicate signature (genuine first)", accepted, False))
        # httpx will not send two Host headers; a raw client does.
        raw = [("Host", PUBLIC_HOST), ("Host", OTHER_HOST), *form, *proxy]
        accepted = await raw_post(base, "/hook?attempt=1", raw, body, app)
        results.append(("forged", "two Host headers", accepted, False))
    # The same headers from a peer that is not a trusted proxy.
    guard = TwilioSignatureMiddleware(app, auth_token=TOKEN, trusted_proxies=["10.0.0.0/8"])
    async with serve(guard) as base:
        accepted = await over_the_wire(base, "/hook?attempt=1", [*form, *proxy], body, app)
        results.append(("forged", "X-Forwarded-* from an untrusted peer", accepted, False))
    # uvicorn applies X-Forwarded-Proto itself (--proxy-headers) for the peers it trusts.
    guard = TwilioSignatureMiddleware(
        app, auth_token=TOKEN, trusted_proxies=TrustedProxies(server_applied=True)
    )
    headers = [*form, ("Host", PUBLIC_HOST), ("X-Forwarded-Proto", "https")]
    async with serve(guard, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as base:
        accepted = await over_the_wire(base, "/hook?attempt=1", headers, body, app)
        results.append(("genuine", "uvicorn --proxy-headers", accepted, True))
    async with serve(guard, proxy_headers=True, forwarded_allow_ips="10.0.0.1") as base:
        accepted = await over_the_wire(base, "/hook?attempt=1", headers, body, app)
        results.append(("forged", "X-Forwarded-Proto uvicorn does not trust", accepted, False))
    # Mounted under --root-path: Twilio signed the public path, the proxy stripped /api.
    mounted = sign(f"https://{PUBLIC_HOST}/api/hook?attempt=1", params)
    headers = [("Content-Type", FORM), ("X-Twilio-Signature", mounted), *proxy]
    guard = TwilioSignatureMiddleware(app, auth_token=TOKEN, trusted_proxies=["127.0.0.1"])
    async with serve(guard, root_path="/api") as base:
        accepted = await over_the_wire(base, "/hook?attempt=1", headers, body, app)
        results.append(("genuine", "uvicorn --root-path", accepted, True))
    # Vapi: a bearer token and an HMAC, genuine and forged.
    clock = Clock()
    guard = VapiWebhookMiddleware(app, bearer_token=VAPI_BEARER, hmac_secret=VAPI_HMAC, clock=clock)
    document = b'{"message":{"type":"status-update","status":"ended"}}'
    timestamp = str(int(NOW))
    good_hmac = vapi_hmac(document, timestamp, "sha256", "hex")
    json_type = ("Content-Type", "application/json")
    async with serve(guard) as base:
        for kind, category, headers, expected in (
            ("genuine", "Vapi bearer", [("Authorization", f"Bearer {VAPI_BEARER}")], True),
            ("forged", "Vapi bearer, wrong token", [("Authorization", "Bearer nope")], False),
            (
                "genuine",
                "Vapi HMAC",
                [("x-timestamp", timestamp), ("x-signature", good_hmac)],
                True,
            ),
            (
                "forged",
                "Vapi HMAC, stale",
                [("x-timestamp", str(int(NOW - 301))), ("x-signature", good_hmac)],
                False,
            ),
        ):
            accepted = await over_the_wire(base, "/vapi", [json_type, *headers], document, app)
            results.append((kind, category, accepted, expected))
    for kind, category, accepted, _ in results:
        record(tally, "uvicorn", kind, category, accepted)
    assert [r for r in results if r[2] is not r[3]] == []
