"""The Pub/Sub side of the Redis lease store: one subscription wakes every waiter of the backend.

:meth:`ListenerFleet.lease_watch` registers a refused front waiter with the backend's
:class:`LeaseListener`; a background task (run while the backend is entered) holds one
subscription to the channels of every lease set declared (and of every shared breaker, see
:mod:`._breaker`), reconnects with backoff when Redis goes away, and wakes every registered
waiter after each (re)subscription, since a release published meanwhile was not heard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from resilient_voice.redis._leases import LeaseSet

__all__ = ["LeaseListener", "ListenerFleet", "text_of"]

_log = logging.getLogger("resilient_voice.redis")


def text_of(value: Any) -> str:
    """A Redis reply item as text (coredis and redis-py answer bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class ListenerFleet:
    """``lease_watch`` of the Redis lease store, and the backend's listener task."""

    __slots__ = ()

    # Provided by RedisBackend.
    _client: Any
    _timeout: float
    _redispy: bool
    _lease_sets: dict[str, LeaseSet]
    _lease_state: LeaseListener

    async def lease_watch(
        self,
        name: str,
        wake: Callable[[], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``wake`` on every release published for set ``name``, until cancelled.

        Only registers ``wake`` with the backend's listener (no round trip on the waiter's
        path); the listener runs while the backend is entered (``async with backend``).
        """
        state = self._lease_state
        channel = self._lease_sets[name].channel
        wakers = state.wakers.setdefault(channel, set())
        wakers.add(wake)
        state.poke()
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            wakers.discard(wake)

    async def _lease_listener(self) -> None:
        """The backend's task: one subscription to the channels of every declared lease set.

        Reconnects with backoff when Redis goes away, and wakes every registered waiter after
        each (re)subscription, since a release published meanwhile was not heard.
        """
        state = self._lease_state
        backoff = 0.5
        while True:
            if not state.channels():
                state.changed = anyio.Event()
                await state.changed.wait()
                continue
            try:
                if self._redispy:
                    await self._listen_redispy(state)
                else:
                    await self._listen_coredis(state)
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001  (coredis wraps its errors in groups)
                # Redis slow or gone: waiters poll (bounded) until the subscription is back.
                _log.debug("lease wake-ups: %s: %s; polling meanwhile", type(exc).__name__, exc)
            await anyio.sleep(backoff)
            # At most 4 s: a replica restores its leases once this reconnects (see _restore).
            backoff = min(backoff * 2, 4.0)

    async def _listen_coredis(self, state: LeaseListener) -> None:
        with anyio.fail_after(max(1.0, 20 * self._timeout)) as scope:
            pubsub_cm = self._client.pubsub(
                channels=sorted(state.channels()), ignore_subscribe_messages=True, retry_policy=None
            )
            async with pubsub_cm as pubsub, anyio.create_task_group() as tasks:
                scope.deadline = math.inf
                subscribed = set(state.channels())
                state.wake_all()

                async def follow() -> None:
                    while True:
                        state.changed = anyio.Event()
                        new = state.channels() - subscribed
                        if new:
                            await pubsub.subscribe(*sorted(new))
                            subscribed.update(new)
                            state.wake_all()
                            continue
                        await state.changed.wait()

                tasks.start_soon(follow)
                async for message in pubsub:
                    state.wake(text_of(message["channel"]), message.get("data"))

    async def _listen_redispy(self, state: LeaseListener) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            subscribed: set[str] = set()
            while True:
                new = state.channels() - subscribed
                if new:
                    with anyio.fail_after(max(1.0, 20 * self._timeout)):
                        await pubsub.subscribe(*sorted(new))
                    subscribed.update(new)
                    state.wake_all()
                message = await pubsub.get_message(timeout=0.5)
                if message is not None:
                    state.wake(text_of(message["channel"]), message.get("data"))
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()


class LeaseListener:
    """The waiters to wake per channel, and the event that tells the listener of new channels.

    Lease sets register their release channels; shared breakers register their announcement
    channels too (:mod:`._breaker`), so one Pub/Sub connection serves the whole backend.
    """

    __slots__ = ("changed", "declared", "heard", "resets", "wakers")

    def __init__(self) -> None:
        self.declared: set[str] = set()
        # Per channel, the latest server time a lease message carried (inf: one without);
        # and how many times the listener (re)subscribed, when messages may have been lost.
        self.heard: dict[str, float] = {}
        self.resets = 0
        self.wakers: dict[str, set[Callable[[], None]]] = {}
        # Built by the listener task (an anyio.Event needs a running loop); None before.
        self.changed: anyio.Event | None = None

    def channels(self) -> set[str]:
        return self.declared

    def poke(self) -> None:
        if self.changed is not None:
            self.changed.set()

    def wake(self, channel: str, data: object = None) -> None:
        text = text_of(data) if data is not None else ""
        try:
            stamp = float(text[1:]) if text.startswith("t") else math.inf
        except ValueError:
            stamp = math.inf
        if stamp > self.heard.get(channel, -math.inf):
            self.heard[channel] = stamp
        for wake in list(self.wakers.get(channel, ())):
            wake()

    def wake_all(self) -> None:
        self.resets += 1
        for wakers in list(self.wakers.values()):
            for wake in list(wakers):
                wake()
