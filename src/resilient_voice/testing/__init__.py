"""Test helpers that ship with the library: use them in your own tests too.

``ManualClock`` is dependency-free. ``FakeTelephony`` (a fault-injecting Twilio/Vapi upstream),
its fault script and records, and ``serve`` (a loopback uvicorn runner) load on first use, so
``import resilient_voice.testing`` imports no web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient_voice._exports import lazy_exports, publish
from resilient_voice.testing._manual_clock import ManualClock

if TYPE_CHECKING:
    from resilient_voice.testing._fake import FakeTelephony
    from resilient_voice.testing._faults import CallbackFaults, Fault
    from resilient_voice.testing._faults import FaultKind as FaultKind
    from resilient_voice.testing._records import (
        CallbackRecord as CallbackRecord,
    )
    from resilient_voice.testing._records import (
        CreatedCall as CreatedCall,
    )
    from resilient_voice.testing._records import (
        CreatedMessage as CreatedMessage,
    )
    from resilient_voice.testing._records import (
        RecordedRequest as RecordedRequest,
    )
    from resilient_voice.testing._serve import serve

__all__ = ["CallbackFaults", "FakeTelephony", "Fault", "ManualClock", "serve"]

# Records the fake hands back to be read (what it received, created and sent), and the kind a
# ``Fault`` carries: importable from here for annotations, not part of ``__all__``.
_RETURN_TYPES = ["CallbackRecord", "CreatedCall", "CreatedMessage", "FaultKind", "RecordedRequest"]

publish(globals(), __all__)
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "FakeTelephony": "resilient_voice.testing._fake",
        "CallbackFaults": "resilient_voice.testing._faults",
        "Fault": "resilient_voice.testing._faults",
        "FaultKind": "resilient_voice.testing._faults",
        "CallbackRecord": "resilient_voice.testing._records",
        "CreatedCall": "resilient_voice.testing._records",
        "CreatedMessage": "resilient_voice.testing._records",
        "RecordedRequest": "resilient_voice.testing._records",
        "serve": "resilient_voice.testing._serve",
    },
    __all__,
)
