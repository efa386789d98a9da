"""The load generator of the inbound soak, run in its own process (tests/soak/test_inbound_load.py).

``python _inbound_load_client.py '<json options>' <result path>`` opens ``connections``
keep-alive HTTP/1.1 connections to 127.0.0.1:``port`` (raw asyncio streams: an HTTP client
library would cost more CPU than the server it measures on a small machine), each reopened
every ``RECONNECT_S``; each sends requests back to back for ``duration`` seconds and checks
every response as it arrives. It writes one JSON object to the result path (a file, not
stdout: a pipe nobody reads while the client runs would block it): counts by status and kind,
latency percentiles, the rate-limited keys' admissions, the worker pids that answered, and
every violation found (up to a cap, with the total).

Connection ``i`` sends one kind of request, by ``i % 10``:

- 0-4 ``cid``: ``GET /echo`` with a unique ``X-Correlation-ID``; 200 echoing that id.
- 5 ``fresh``: ``GET /echo`` without an id; 200 whose header and body carry the same new id,
  never seen before.
- 6-7 ``keyed``: ``GET /echo`` with an id and ``X-Api-Key: k<n>`` (``keys`` keys, rate-limited
  in Redis across the workers); 200 echoing the id, or 429 naming it. Only the first
  ``keyed_connections`` of them; the others send ``cid`` requests.
- 8 ``signed``: ``POST /twilio/status`` with a genuine Twilio signature; 200 echoing the id.
- 9 ``forged``: the same form unsigned or signed with the wrong token, alternately; 403 under
  a fresh id (never the one offered).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

from twilio.request_validator import RequestValidator

KINDS = ("cid",) * 5 + ("fresh", "keyed", "keyed", "signed", "forged")
MAX_EXAMPLES = 20
RECONNECT_S = 1.0
"""Seconds a connection is used before it is closed and opened again. uvicorn's workers share one
listening socket and the kernel hands each new connection to whichever worker accepts first;
connections opened in one burst and kept for the whole run can all land on two busy workers
and leave the third without load (seen in CI). Reconnecting spreads them over the run."""


class Run:
    """What every connection records, checked as responses arrive."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.port = int(options["port"])
        self.connections = int(options["connections"])
        self.duration = float(options["duration"])
        self.keys = int(options["keys"])
        self.keyed_rows = int(options["keyed_connections"]) // 2
        self.nonce = os.urandom(4).hex()
        url = options["base_url"].rstrip("/") + "/twilio/status"
        self.form = b"CallSid=CA" + b"0" * 32 + b"&CallStatus=completed"
        params = {"CallSid": "CA" + "0" * 32, "CallStatus": "completed"}
        self.signature = RequestValidator(options["token"]).compute_signature(url, params)
        self.forged = RequestValidator("not-the-token").compute_signature(url, params)
        self.statuses: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.kind_latencies: dict[str, list[float]] = {kind: [] for kind in set(KINDS)}
        self.violations: list[str] = []
        self.violation_count = 0
        self.fresh_ids: set[bytes] = set()
        self.pids: set[str] = set()
        self.admitted: dict[str, list[tuple[float, float]]] = {
            f"k{n}": [] for n in range(self.keys)
        }
        self.offered: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.start = 0.0

    def violation(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_EXAMPLES:
            self.violations.append(text)

    def request(self, index: int, seq: int) -> tuple[str, bytes, bytes, str | None]:
        """The request bytes of connection ``index``'s request ``seq``: (kind, cid, bytes, key)."""
        kind = KINDS[index % 10]
        if kind == "keyed" and index // 10 >= self.keyed_rows:
            kind = "cid"
        cid = f"{self.nonce}-{index}-{seq}".encode()
        host = b"Host: 127.0.0.1:%d\r\n" % self.port
        if kind == "fresh":
            return kind, b"", b"GET /echo HTTP/1.1\r\n" + host + b"\r\n", None
        head = b"X-Correlation-ID: " + cid + b"\r\n"
        if kind == "cid":
            return kind, cid, b"GET /echo HTTP/1.1\r\n" + host + head + b"\r\n", None
        if kind == "keyed":
            key = f"k{(2 * (index // 10) + index % 2) % self.keys}"
            head += b"X-Api-Key: " + key.encode() + b"\r\n"
            return kind, cid, b"GET /echo HTTP/1.1\r\n" + host + head + b"\r\n", key
        signature = self.signature
        if kind == "forged":
            signature = self.forged if seq % 2 else ""
        if signature:
            head += b"X-Twilio-Signature: " + signature.encode() + b"\r\n"
        head += b"Content-Type: application/x-www-form-urlencoded\r\n"
        head += b"Content-Length: %d\r\n" % len(self.form)
        return (
            kind,
            cid,
            b"POST /twilio/status HTTP/1.1\r\n" + host + head + b"\r\n" + self.form,
            None,
        )

    def check(
        self,
        kind: str,
        cid: bytes,
        key: str | None,
        status: int,
        headers: dict[bytes, bytes],
        body: bytes,
        sent_at: float,
        received_at: float,
    ) -> None:
        self.statuses[str(status)] += 1
        self.by_kind[f"{kind} {status}"] += 1
        echoed = headers.get(b"x-correlation-id")
        seen = body.split(b" ", 1)[1] if status == 200 and b" " in body else None
        if status == 200:
            self.pids.add(body.split(b" ", 1)[0].decode())
        expected = {"cid": 200, "fresh": 200, "keyed": 200, "signed": 200, "forged": 403}[kind]
        if kind == "keyed" and key is not None:
            self.offered[key] += 1
            if status == 429:
                expected = 429
                if b"retry-after" not in headers:
                    self.violation(f"429 without Retry-After for {cid!r}")
            elif status == 200:
                self.admitted[key].append((sent_at, received_at))
        if status != expected:
            self.violation(f"{kind}: status {status}, expected {expected}: {body[:80]!r}")
            return
        if echoed is None:
            self.violation(f"{kind}: no X-Correlation-ID in a {status}")
            return
        if kind == "fresh":
            if seen != echoed:
                self.violation(f"fresh: the app saw {seen!r}, the header says {echoed!r}")
            if echoed in self.fresh_ids:
                self.violation(f"fresh: the id {echoed!r} was given twice")
            self.fresh_ids.add(echoed)
        elif kind == "forged":
            # A refusal is filed under a fresh id: the forger never chooses it.
            if echoed == cid or echoed in self.fresh_ids:
                self.violation(f"forged: refused under a chosen or reused id {echoed!r}")
            self.fresh_ids.add(echoed)
        else:
            if echoed != cid:
                self.violation(f"{kind}: sent {cid!r}, the header says {echoed!r}")
            if status == 200 and seen != cid:
                self.violation(f"{kind}: sent {cid!r}, the app saw {seen!r}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name in headers:
            headers[name] += b"," + value.strip()  # a repeated header shows up as a list
        else:
            headers[name] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def connection(run: Run, index: int, ready: asyncio.Event, go: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
    finally:
        ready.set()  # a failed connect fails the run (gather raises), never hangs it
    await go.wait()
    deadline = run.start + run.duration
    seq = 0
    opened = time.monotonic()
    try:
        while True:
            sent_at = time.monotonic()
            if sent_at >= deadline:
                break
            if sent_at - opened >= RECONNECT_S:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
                opened = sent_at = time.monotonic()
            kind, cid, data, key = run.request(index, seq)
            seq += 1
            writer.write(data)
            try:
                status, headers, body = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                run.errors[type(exc).__name__] += 1
                run.violation(f"{kind}: connection failed: {exc!r}")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
                continue
            received_at = time.monotonic()
            run.latencies.append(received_at - sent_at)
            run.kind_latencies[kind].append(received_at - sent_at)
            run.check(
                kind, cid, key, status, headers, body, sent_at - run.start, received_at - run.start
            )
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
    finally:
        writer.close()


async def main(options: dict[str, Any]) -> dict[str, Any]:
    run = Run(options)
    go = asyncio.Event()
    readies = [asyncio.Event() for _ in range(run.connections)]
    tasks = [
        asyncio.create_task(connection(run, i, readies[i], go)) for i in range(run.connections)
    ]
    for ready in readies:
        await ready.wait()
    run.start = time.monotonic()
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), run.duration + 60)
    elapsed = time.monotonic() - run.start
    latencies = sorted(run.latencies)

    def percentile(q: float, values: list[float] = latencies) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    by_kind = {}
    for kind, values in sorted(run.kind_latencies.items()):
        values.sort()
        by_kind[kind] = (
            round(1000 * percentile(0.5, values)),
            round(1000 * percentile(0.99, values)),
        )

    return {
        "connections": run.connections,
        "start_monotonic": run.start,
        "elapsed": elapsed,
        "requests": len(latencies),
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(0.50),
        "p99_ms": 1000 * percentile(0.99),
        "max_ms": 1000 * (latencies[-1] if latencies else 0.0),
        "latency_by_kind": by_kind,
        "statuses": dict(run.statuses),
        "by_kind": dict(run.by_kind),
        "fresh_ids": len(run.fresh_ids),
        "pids": sorted(run.pids),
        "admitted": run.admitted,
        "offered": dict(run.offered),
        "errors": dict(run.errors),
        "violations": run.violations,
        "violation_count": run.violation_count,
    }


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    with open(sys.argv[2], "w", encoding="utf-8") as file:
        json.dump(result, file)
