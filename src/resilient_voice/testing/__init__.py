"""Test helpers that ship with the library: use them in your own tests too.

``ManualClock`` is dependency-free. ``FakeTelephony`` (a fault-injecting Twilio/Vapi upstream),
its fault script and records, and ``serve`` (a loopback uvicorn runner) load on first use, so
``import resilient_voice.testing`` imports no web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient_voice.testing._manual_clock import ManualClock

ManualClock.__module__ = __name__

if TYPE_CHECKING:
    from resilient_voice.testing._fake import ENDPOINTS, FakeTelephony
    from resilient_voice.testing._faults import CallbackFaults, Fault, FaultKind
    from resilient_voice.testing._records import (
        CallbackRecord,
        CreatedCall,
        CreatedMessage,
        RecordedRequest,
    )
    from resilient_voice.testing._serve import DropConnectionError, serve

__all__ = [
    "ENDPOINTS",
    "CallbackFaults",
    "CallbackRecord",
    "CreatedCall",
    "CreatedMessage",
    "DropConnectionError",
    "FakeTelephony",
    "Fault",
    "FaultKind",
    "ManualClock",
    "RecordedRequest",
    "serve",
]

_LAZY = {
    "ENDPOINTS": "_fake",
    "FakeTelephony": "_fake",
    "CallbackFaults": "_faults",
    "Fault": "_faults",
    "FaultKind": "_faults",
    "CallbackRecord": "_records",
    "CreatedCall": "_records",
    "CreatedMessage": "_records",
    "RecordedRequest": "_records",
    "DropConnectionError": "_serve",
    "serve": "_serve",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if isinstance(value, type) or callable(value):
        value.__module__ = __name__  # show the public path in reprs and docs
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
