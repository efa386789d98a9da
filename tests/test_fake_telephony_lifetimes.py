"""FakeTelephony's call lifetimes: seeded random durations, Twilio's call concurrency (10004,
distinct from the REST concurrency of 20429), Vapi's blocked calls, delayed webhooks and the
peak of calls in progress. In-process on a ManualClock; both backends.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import anyio
import pytest

from resilient_voice.testing import FakeTelephony, ManualClock
from test_fake_telephony import (
    AC,
    CALL_FORM,
    CALLS,
    HOOKS,
    TOKEN,
    VAPI_AUTH,
    Receiver,
    create_call,
    make_fake,
    running,
)


async def settle(receiver: Receiver, count: int) -> None:
    """Let in-process webhooks already due reach ``receiver`` (they run on the test's loop)."""
    with anyio.fail_after(5):
        while len(receiver.received) < count:
            await anyio.sleep(0.001)


def form(entry: tuple[str, str, dict[str, str], bytes]) -> dict[str, str]:
    return dict(parse_qsl(entry[3].decode()))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"call_duration": (2.0, 1.0)}, ValueError),
        ({"call_duration": (1.0,)}, TypeError),
        ({"call_duration": (-1.0, 2.0)}, ValueError),
        ({"call_duration": (0.0, float("inf"))}, ValueError),
        ({"ring_duration": (1.0, "2")}, TypeError),
        ({"callback_delay": -0.5}, ValueError),
        ({"callback_delay": (0.5, 0.1)}, ValueError),
        ({"twilio_call_concurrency_limit": 0}, ValueError),
        ({"twilio_call_concurrency_limit": True}, TypeError),
        ({"twilio_call_concurrency_limit": 1.5}, TypeError),
    ],
)
def test_bad_lifetime_options_are_refused_naming_the_option(
    options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=next(iter(options))):
        make_fake(**options)


async def twilio_durations(seed: int) -> list[int]:
    clock = ManualClock()
    fake = make_fake(seed=seed, call_duration=(10.0, 100.0), status_callbacks=False, clock=clock)
    async with running(fake) as client:
        sids = [(await create_call(client, To=f"+1415555{i:04d}")).json()["sid"] for i in range(8)]
        clock.advance(200.0)
        calls = [fake.twilio_call(sid) for sid in sids]
    return [int(call["duration"]) for call in calls if call is not None]


async def test_twilio_call_durations_are_drawn_from_the_seed() -> None:
    first, again, other = (
        await twilio_durations(3),
        await twilio_durations(3),
        await twilio_durations(4),
    )
    assert first == again
    assert first != other
    assert all(10 <= seconds <= 100 for seconds in first)
    assert len(set(first)) > 4  # drawn per call, not once


async def test_vapi_call_durations_follow_the_range_too() -> None:
    clock = ManualClock()
    fake = make_fake(call_duration=(1.0, 2.0), ring_duration=(0.5, 0.5), clock=clock)
    body = {
        "assistantId": fake.vapi_assistants()[0]["id"],
        "phoneNumberId": fake.vapi_phone_numbers()[0]["id"],
        "customer": {"number": "+14155550100"},
    }
    async with running(fake) as client:
        answers = [await client.post("/call", json=body, headers=VAPI_AUTH) for _ in "ab"]
        ids = [answer.json()["id"] for answer in answers]
        clock.advance(1.4)  # rang 0.5 s, then at least 1 s in progress: none ended yet
        assert {fake.vapi_call(i)["status"] for i in ids} == {"in-progress"}  # type: ignore[index]
        clock.advance(1.2)
        assert {fake.vapi_call(i)["status"] for i in ids} == {"ended"}  # type: ignore[index]


async def test_a_call_dialled_over_the_call_concurrency_fails_with_10004() -> None:
    clock = ManualClock()
    receiver = Receiver()
    fake = make_fake(call_duration=10.0, twilio_call_concurrency_limit=2, clock=clock)
    async with running(fake, webhooks=receiver) as client:
        answers = [
            await create_call(client, To=f"+141555501{i:02d}", StatusCallback=f"{HOOKS}/status")
            for i in range(3)
        ]
        # Twilio accepts every create: the limit is on calls in progress, not on requests.
        assert [a.status_code for a in answers] == [201, 201, 201]
        assert [a.json()["status"] for a in answers] == ["queued"] * 3
        clock.advance(0.01)  # CPS 1000: the third is dialled 2 ms after the first
        await settle(receiver, 1)
        (failed,) = [form(entry) for entry in receiver.received]
        assert failed["CallSid"] == answers[2].json()["sid"]
        assert failed["CallStatus"] == "failed"
        assert failed["ErrorCode"] == "10004"
        assert "concurrency" in failed["ErrorMessage"].lower()
        fetched = fake.twilio_call(answers[2].json()["sid"])
        assert fetched is not None
        assert fetched["status"] == "failed"
        clock.advance(10.0)  # the first two end: slots free again
        await settle(receiver, 3)
        later = await create_call(client, To="+14155550199", StatusCallback=f"{HOOKS}/status")
        clock.advance(10.0)
        await settle(receiver, 4)
    statuses = {form(e)["CallSid"]: form(e)["CallStatus"] for e in receiver.received}
    assert statuses[later.json()["sid"]] == "completed"
    assert "ErrorCode" not in form(receiver.received[-1])
    assert fake.peak_calls_in_progress("twilio") == 2
    assert fake.peak_calls_in_progress("twilio", account=AC) == 2
    assert [r.fault for r in fake.requests()] == [None] * 4  # no 20429: another limit


async def test_call_concurrency_is_not_the_rest_concurrency() -> None:
    """``twilio_concurrency_limit`` answers 20429 to requests; calls in progress stay free."""
    clock = ManualClock()
    fake = make_fake(call_duration=10.0, twilio_concurrency_limit=1, clock=clock)
    async with running(fake) as client:
        answers = [await create_call(client, To=f"+141555502{i:02d}") for i in range(5)]
        clock.advance(1.0)
        statuses = [fake.twilio_call(a.json()["sid"])["status"] for a in answers]  # type: ignore[index]
    assert [a.status_code for a in answers] == [201] * 5
    assert statuses == ["in-progress"] * 5
    assert fake.peak_calls_in_progress("twilio") == 5


async def test_queued_and_canceled_calls_hold_no_slot() -> None:
    clock = ManualClock()
    fake = make_fake(
        calls_per_second=1.0, call_duration=0.5, twilio_call_concurrency_limit=1, clock=clock
    )
    async with running(fake) as client:
        first = await create_call(client, To="+14155550101")
        second = await create_call(client, To="+14155550102")  # dialled 1 s later
        third = await create_call(client, To="+14155550103")  # dialled 2 s later
        url = f"{CALLS[:-5]}/{third.json()['sid']}.json"
        cancel = await client.post(url, data={"Status": "canceled"}, auth=(AC, TOKEN))
        assert cancel.json()["status"] == "canceled"
        clock.advance(3.0)
        statuses = [
            fake.twilio_call(r.json()["sid"])["status"]  # type: ignore[index]
            for r in (first, second, third)
        ]
    assert statuses == ["completed", "completed", "canceled"]
    assert fake.peak_calls_in_progress("twilio") == 1


async def test_vapi_blocked_call_ends_at_once_with_the_concurrency_reason() -> None:
    clock = ManualClock()
    receiver = Receiver()
    fake = make_fake(
        call_duration=5.0,
        vapi_concurrency_limit=1,
        vapi_server_url=f"{HOOKS}/vapi",
        clock=clock,
    )
    body = {
        "assistantId": fake.vapi_assistants()[0]["id"],
        "phoneNumberId": fake.vapi_phone_numbers()[0]["id"],
        "customer": {"number": "+14155550100"},
    }
    async with running(fake, webhooks=receiver) as client:
        first = (await client.post("/call", json=body, headers=VAPI_AUTH)).json()
        blocked = (await client.post("/call", json=body, headers=VAPI_AUTH)).json()
        assert first["subscriptionLimits"] == {
            "concurrencyBlocked": False,
            "concurrencyLimit": 1,
            "remainingConcurrentCalls": 0,
        }
        assert blocked["subscriptionLimits"]["concurrencyBlocked"] is True
        await settle(receiver, 2)
        fetched = fake.vapi_call(blocked["id"])
        assert fetched is not None
        assert fetched["status"] == "ended"
        assert fetched["endedReason"] == "call.start.error-subscription-concurrency-limit-reached"
        assert "startedAt" not in fetched
        clock.advance(5.0)
        await settle(receiver, 5)
    messages = [json.loads(entry[3])["message"] for entry in receiver.received]
    blocked_messages = [m for m in messages if m["call"]["id"] == blocked["id"]]
    assert [(m["type"], m.get("status")) for m in blocked_messages] == [
        ("status-update", "ended"),
        ("end-of-call-report", None),
    ]
    assert {m["endedReason"] for m in blocked_messages} == {
        "call.start.error-subscription-concurrency-limit-reached"
    }
    assert fake.peak_calls_in_progress("vapi") == 1


async def test_callback_delay_sends_each_webhook_later_without_holding_up_the_next() -> None:
    clock = ManualClock(autojump=True)  # jumps to each deadline exactly: times are exact
    receiver = Receiver()
    fake = make_fake(call_duration=1.0, callback_delay=5.0, clock=clock)
    async with running(fake, webhooks=receiver) as client:
        await create_call(
            client,
            StatusCallback=f"{HOOKS}/status",
            StatusCallbackEvent="initiated answered completed",
        )
        await clock.sleep_until(4.9)  # the call completed at 1 s; nothing has arrived
        assert receiver.received == []
        await clock.sleep_until(5.5)  # 5 s after the call was dialled and answered
        assert len(receiver.received) == 2
        await clock.sleep_until(7.0)  # 5 s after it completed
    statuses = [form(e)["CallStatus"] for e in receiver.received]
    assert sorted(statuses[:2]) == ["in-progress", "initiated"]  # due at the same moment
    assert statuses[2] == "completed"
    assert [r.time for r in fake.callbacks()] == [5.0, 5.0, 6.0]


async def callback_times(seed: int) -> list[float]:
    clock = ManualClock(autojump=True)
    receiver = Receiver()
    fake = make_fake(seed=seed, call_duration=0.0, callback_delay=(1.0, 3.0), clock=clock)
    async with running(fake, webhooks=receiver) as client:
        for i in range(6):
            await create_call(client, To=f"+141555503{i:02d}", StatusCallback=f"{HOOKS}/s")
        await clock.sleep_until(10.0)
    assert len(receiver.received) == 6
    return [r.time for r in sorted(fake.callbacks(), key=lambda r: r.call_id)]


async def test_a_callback_delay_range_is_drawn_per_webhook_from_the_seed() -> None:
    first, again = await callback_times(5), await callback_times(5)
    assert first == again
    assert all(1.0 <= t <= 3.0 + 0.01 for t in first)  # dialled within 6 ms (CPS 1000)
    assert len(set(first)) > 2


def test_the_fake_documents_the_new_options() -> None:
    doc = FakeTelephony.__doc__ or ""
    for name in ("twilio_call_concurrency_limit", "callback_delay", "10004", "(min, max)"):
        assert name in doc
    assert CALL_FORM["To"]
