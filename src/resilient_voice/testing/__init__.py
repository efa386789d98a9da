"""Test helpers that ship with the library: use them in your own tests too.

``ManualClock`` is dependency-free. ``FakeTelephony`` and ``serve`` (a fault-injecting
Twilio/Vapi upstream and a loopback uvicorn runner) import their web stack on first use.
"""

from __future__ import annotations

from resilient_voice.testing._manual_clock import ManualClock

__all__ = ["ManualClock"]
