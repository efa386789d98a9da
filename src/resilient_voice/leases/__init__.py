"""Call-concurrency leases: a slot held for a whole phone call, released by the provider's webhook.

Where things live:

- ``_core``: :class:`~._core.LeaseTable`, the rules (pure, synchronous, clock-free;
  property-tested on its own).
- ``_store``: the :class:`LeaseStore` seam for lease sets shared across processes, and
  ``InMemoryLeaseStore``, its reference implementation and the default.
- ``_records``: :class:`Lease` and ``LeaseStatistics``, the records handed out.
- ``_facade``: :class:`CallLeases`, the facade that awaits, times and reports.

See docs/leases.md.
"""

from __future__ import annotations

from resilient_voice._exports import publish
from resilient_voice.leases._facade import CallLeases
from resilient_voice.leases._records import Lease
from resilient_voice.leases._records import LeaseStatistics as LeaseStatistics
from resilient_voice.leases._store import LeaseStore

__all__ = ["CallLeases", "Lease", "LeaseStore"]

# The record ``statistics()`` hands back: importable from here for annotations, not in
# ``__all__``.
_RETURN_TYPES = ["LeaseStatistics"]

publish(globals(), [*__all__, *_RETURN_TYPES])
