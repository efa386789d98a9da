"""The permit: admission to make one call, and the one way to report how it went.

:meth:`BreakerPermit.settle` takes what the call produced (an exception, or a returned value) and
lets the breaker judge it; :meth:`BreakerPermit.release` gives back a permit whose call never ran.
Only the first report counts, so settling again from a ``finally`` is harmless.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from resilient_voice.breaker._config import IGNORED_KINDS
from resilient_voice.failure import FailureKind

if TYPE_CHECKING:
    from resilient_voice.breaker._facade import CircuitBreaker
    from resilient_voice.breaker._owner import Owner

__all__ = ["BreakerPermit"]


class _NoResult:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no result>"


_NO_RESULT: Final = _NoResult()


class BreakerPermit:
    """Admission to make one call, granted by :meth:`CircuitBreaker.acquire`.

    Report its outcome once with :meth:`settle`, or give it back with :meth:`release` if the
    call was never made. Outcomes of a permit granted before the breaker last changed state are
    dropped.

    Attributes:
        epoch: The breaker state generation this permit was granted in.
        probe: Whether this call is a half-open probe.
        granted_at: When it was granted (``None`` when the breaker does not time calls).
        started: When the call started (see :meth:`mark_started`).
    """

    __slots__ = (
        "_breaker",
        "_done",
        "_owner",
        "_probe_start",
        "_token",
        "epoch",
        "granted_at",
        "probe",
        "started",
    )

    def __init__(
        self,
        breaker: CircuitBreaker,
        epoch: int,
        probe: bool,
        granted_at: float | None,
        probe_start: float | None = None,
        owner: Owner | None = None,
    ) -> None:
        self._breaker = breaker
        self._done = False
        self.epoch = epoch
        self.probe = probe
        self.granted_at = granted_at
        self.started = granted_at
        # A probe's entry in the state machine: its start time in ``probes``, or None while it
        # is counted in ``probes_waiting``.
        self._probe_start = probe_start
        # The thread and loop this permit is counted for; None for a permit the breaker does
        # not count.
        self._owner = owner
        self._token: contextvars.Token[BreakerPermit | None] | None = None

    @property
    def done(self) -> bool:
        """Whether an outcome was already reported."""
        return self._done

    def mark_started(self) -> None:
        """Start timing the call now (after waiting for a rate limiter, say).

        Durations are measured from here, and so is a probe's run time: a probe counts as hung
        only once it has *run* for ``max_wait_in_half_open``.
        """
        if self.started is not None:
            breaker = self._breaker
            now = breaker._clock.now()
            self.started = now
            if self.probe and not self._done:
                machine = breaker._machine
                if machine.start_probe(self.epoch, self._probe_start, now):
                    self._probe_start = now

    def settle(
        self,
        error: BaseException | None = None,
        /,
        *,
        result: object = _NO_RESULT,
        kind: FailureKind | None = None,
    ) -> None:
        """Report how the call went; only the first report counts.

        Args:
            error: What the call raised; the breaker classifies it (see
                :meth:`CircuitBreaker.classify`) as a failure, ignored, or cancelled (which
                frees a probe slot and counts nothing). ``None``: the call returned.
            result: What the call returned, judged by the breaker's ``failure_result``
                predicate when it has one. Leave it out to report a plain success.
            kind: The failure kind a caller's own classification gave ``error`` (a
                ``classify=`` hook, as the transport passes its httpx table). An error the
                breaker would count is ignored when this kind is ``UNPROCESSED`` or
                ``PERMANENT``, by the same rule the breaker applies to kinds it reads itself.

        Raises:
            RuntimeError: Reported from another thread or event loop than the one that holds
                the breaker's permits (the outcome is not counted; a probe slot is freed).
            Exception: Whatever ``failure_result`` raised (the permit is then released).
        """
        if self._done:
            return
        breaker = self._breaker
        if error is None:
            predicate = breaker._failure_result
            if predicate is not None and result is not _NO_RESULT:
                try:
                    failed = predicate(result)
                except BaseException:
                    self.release()
                    raise
                if failed:
                    self._report(breaker._failed, None)
                    return
            self._report(breaker._succeeded)
            return
        verdict = breaker.classify(error)
        if verdict == "failure" and kind in IGNORED_KINDS:
            verdict = "ignored"
        if verdict == "failure":
            self._report(breaker._failed, error)
        elif verdict == "ignored":
            self._report(breaker._ignored, error)
        else:
            self._report(breaker._released)

    def release(self) -> None:
        """Give the permit back unused: the call was never made. Frees a probe slot."""
        if not self._done:
            self._report(self._breaker._released)

    def _report(self, record: Callable[..., None], *args: Any) -> None:
        self._done = True
        owner = self._owner
        if owner is None:
            record(self, *args)
            return
        # The permit stays counted while its outcome is recorded, so that no other loop can
        # take the breaker over halfway through the change.
        try:
            allowed = self._breaker._ownership.may_settle(owner)
        except BaseException:
            self._breaker._released(self)
            raise
        if not allowed:
            self._breaker._released(self)
            return
        try:
            record(self, *args)
        finally:
            owner.permits -= 1

    def __repr__(self) -> str:
        return (
            f"<BreakerPermit breaker={self._breaker.name!r} epoch={self.epoch} "
            f"probe={self.probe} done={self._done}>"
        )
