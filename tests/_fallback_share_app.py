"""The inbound soak's app, instrumented for tests/soak/fallback_share.py.

``RV_OLD_RULE=1`` makes the fallback divide by the last answer's replica count (the rule before
the peak of ``resilient_voice.redis._replicas``), to measure before and after on one tree. On
shutdown each worker writes to ``RV_DUMP/<pid>.json`` how many local grants it divided by each
count, and what its backend last knew of the limiter's replicas.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import _inbound_load_app as inner
from resilient_voice.redis import RedisBackend, _replicas

if os.environ.get("RV_OLD_RULE") == "1":
    _replicas.ReplicaPeak.most = _replicas.ReplicaPeak.last  # type: ignore[method-assign]

_used: Counter[int] = Counter()
_live_replicas = RedisBackend.live_replicas


def _counted(self: RedisBackend, key: str) -> int:
    count = _live_replicas(self, key)
    _used[count] += 1  # read once per grant of the local fallback
    return count


RedisBackend.live_replicas = _counted  # type: ignore[method-assign]


def _dump() -> None:
    peaks = {
        name: {"most": peak.most, "last": peak.last} for name, peak in inner.backend._live.items()
    }
    path = os.path.join(os.environ["RV_DUMP"], f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump({"divided_by": dict(_used), "replicas": peaks}, out)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "lifespan":
        await inner.app(scope, receive, send)
        return

    async def receive_and_dump() -> Any:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            _dump()
        return message

    await inner.app(scope, receive_and_dump, send)
