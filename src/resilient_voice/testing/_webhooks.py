"""Webhook delivery for the fake: status callbacks and Vapi server messages.

Deliveries run in the fake's background task group on the server's loop, with an httpx client
created on first use (over the transport :meth:`FakeTelephony.running` was given, if any) and
closed when the fake stops. A failing receiver is recorded, never
raised: the fake must keep serving whatever its webhooks meet. Loss, duplication and reordering
follow :class:`~resilient_voice.testing.CallbackFaults` with the fake's seeded randomness.
"""

from __future__ import annotations

import functools
import ssl
from typing import TYPE_CHECKING

from resilient_voice.testing._fake_common import Core, Span
from resilient_voice.testing._faults import CallbackFaults
from resilient_voice.testing._records import CallbackRecord, Provider

if TYPE_CHECKING:
    import httpx


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Building the default context costs about 100 ms; fakes are created by the hundred.
    return ssl.create_default_context()


class WebhookSender:
    """Sends webhooks with injected misbehaviour and records every attempt."""

    def __init__(
        self, core: Core, faults: CallbackFaults, timeout: float, delay: Span = (0.0, 0.0)
    ) -> None:
        self._core = core
        self._faults = faults
        self._timeout = timeout
        self._delay = delay
        self._client: httpx.AsyncClient | None = None
        self.transport: httpx.AsyncBaseTransport | None = None
        self.records: list[CallbackRecord] = []

    async def deliver(
        self,
        *,
        provider: Provider,
        kind: str,
        call_id: str,
        status: str,
        url: str,
        method: str,
        headers: dict[str, str],
        content: bytes,
    ) -> None:
        """Send one webhook now (or ``callback_delay`` later), or misbehave as the faults say.

        A delayed webhook is sent from its own task, so the events of a call after it are not
        held up: with a range of delays they may overtake it, as on the internet.
        """
        faults = self._faults
        with self._core.lock:
            rng = self._core.callbacks
            lost = faults.loss > 0 and rng.random() < faults.loss
            duplicate = faults.duplicate > 0 and rng.random() < faults.duplicate
            reorder = faults.reorder > 0 and rng.random() < faults.reorder
            hold = rng.uniform(0.0, faults.reorder_delay) if reorder else 0.0
            hold += self._core.draw(self._delay, self._core.delays)
        args = (provider, kind, call_id, status, url, method, headers, content)
        if lost:
            self._record(*args[:5], duplicate=False, lost=True, response_status=None, error=None)
            return
        if (reorder or hold > 0) and self._core.spawn(self._send_later, hold, duplicate, *args):
            return
        await self._send(*args, duplicate=False)
        if duplicate:
            await self._send(*args, duplicate=True)

    async def _send_later(
        self,
        delay: float,
        duplicate: bool,
        provider: Provider,
        kind: str,
        call_id: str,
        status: str,
        url: str,
        method: str,
        headers: dict[str, str],
        content: bytes,
    ) -> None:
        await self._core.clock.sleep(delay)
        args = (provider, kind, call_id, status, url, method, headers, content)
        await self._send(*args, duplicate=False)
        if duplicate:
            await self._send(*args, duplicate=True)

    async def _send(
        self,
        provider: Provider,
        kind: str,
        call_id: str,
        status: str,
        url: str,
        method: str,
        headers: dict[str, str],
        content: bytes,
        *,
        duplicate: bool,
    ) -> None:
        response_status: int | None = None
        error: str | None = None
        try:
            client = self._http()
            if method == "GET":
                response = await client.get(url, headers=headers)
            else:
                response = await client.request(method, url, headers=headers, content=content)
            response_status = response.status_code
        except Exception as exc:  # noqa: BLE001  # a broken receiver must never crash the fake
            error = f"{type(exc).__name__}: {exc}"
        self._record(
            provider,
            kind,
            call_id,
            status,
            url,
            duplicate=duplicate,
            lost=False,
            response_status=response_status,
            error=error,
        )

    def _record(
        self,
        provider: Provider,
        kind: str,
        call_id: str,
        status: str,
        url: str,
        *,
        duplicate: bool,
        lost: bool,
        response_status: int | None,
        error: str | None,
    ) -> None:
        record = CallbackRecord(
            time=self._core.elapsed(),
            provider=provider,
            kind=kind,
            call_id=call_id,
            status=status,
            url=url,
            duplicate=duplicate,
            lost=lost,
            response_status=response_status,
            error=error,
        )
        with self._core.lock:
            self.records.append(record)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            if self.transport is not None:
                self._client = httpx.AsyncClient(
                    transport=self.transport, timeout=self._timeout, follow_redirects=False
                )
            else:
                self._client = httpx.AsyncClient(
                    timeout=self._timeout, follow_redirects=False, verify=_ssl_context()
                )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (when the fake stops); the transport is the caller's."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
