"""Start worker processes and release them together: a barrier over their stdin and stdout.

A fixed lead ("start 2 s from now: every interpreter is up and connected by then") is luck on a
loaded CI machine: a worker that imports and connects late starts late, and the test then
measures that skew instead of the library. Here every worker says ``ready`` once it is fully set
up, the parent waits (bounded) for all of them, and only then picks the start time, a short
``LEAD`` ahead, and hands it to every worker at once.

The protocol, one line each way:

- worker to parent: ``ready`` on stdout (flushed), then after the run its result as JSON on the
  rest of stdout;
- parent to worker: a JSON object ``{"start": <time.time()>}`` on stdin (wall-clock time, the one
  clock every process on the host shares); times relative to the start (a stop, a recovery)
  are computed from it.

A worker calls :func:`released` from async code: stdin is read in a thread, so the event loop
(and a backend's background tasks, such as the breaker fleet's heartbeat) keeps running while
it waits. Workers get ``PYTHONPATH`` holding ``src`` and ``tests``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self

import anyio

__all__ = ["LEAD", "READY", "READY_TIMEOUT", "Together", "released", "run_together"]

READY = "ready"
LEAD = 0.3
"""Seconds from the release to the start: the time to write a line to each worker and for each
to wake from its read (milliseconds, even on a loaded machine)."""
READY_TIMEOUT = 60.0
"""Seconds allowed for every worker to import, connect and say ``ready`` (a loaded 2-core CI
machine starts a few interpreters in a few seconds; 60 s only bounds a hung worker)."""


async def released() -> float:
    """Say ``ready``, wait for the parent's release, sleep until its start time; return it.

    Call it once the worker is fully set up (imported, connected, its primitives built).
    """
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if not line:
        raise SystemExit("released(): stdin closed before the release (is the parent gone?)")
    start = float(json.loads(line)["start"])
    await anyio.sleep(max(0.0, start - time.time()))
    return start


class _Worker:
    """One worker process and the thread that reads its stdout (so waits can be bounded)."""

    def __init__(self, index: int, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.index = index
        self.command = list(command)
        # A file, not a pipe: a chatty worker never blocks on a full stderr pipe, and its tail
        # goes into the failure message.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                text=True,
                env=dict(env),
            )
        except BaseException:
            self.stderr.close()
            raise
        self.first = ""
        self.rest = ""
        self.said = threading.Event()  # the first line (or end of file) was read
        self.done = threading.Event()  # stdout reached end of file
        self.reader = threading.Thread(
            target=self._read, name=f"worker-{index}-stdout", daemon=True
        )
        self.reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            self.first = stdout.readline()
            self.said.set()
            self.rest = stdout.read()
        finally:
            self.said.set()
            self.done.set()

    def failure(self, what: str) -> AssertionError:
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:].decode(errors="replace")
        name = " ".join(self.command[1:2])
        code = self.process.poll()
        return AssertionError(
            f"worker {self.index} ({name}) {what}; exit code {code}; stderr:\n{tail}"
        )


class Together:
    """Worker processes started at once and released together.

    Use as a context manager: leaving it kills any worker still running (a failed test leaves
    no process behind). :meth:`release` waits for every ``ready`` and hands out the start time;
    :meth:`results` collects each worker's JSON result.
    """

    def __init__(self, commands: Sequence[Sequence[str]], *, env: Mapping[str, str]) -> None:
        self._workers: list[_Worker] = []
        try:
            for index, command in enumerate(commands):
                self._workers.append(_Worker(index, command, env))
        except BaseException:
            self.close()
            raise

    @property
    def processes(self) -> list[subprocess.Popen[str]]:
        return [worker.process for worker in self._workers]

    def release(self, *, lead: float = LEAD, ready_timeout: float = READY_TIMEOUT) -> float:
        """Wait until every worker is ready, then give them all one start ``lead`` s ahead."""
        deadline = time.monotonic() + ready_timeout
        for worker in self._workers:
            if not worker.said.wait(max(0.0, deadline - time.monotonic())):
                raise worker.failure(f"was not ready within {ready_timeout:g} s")
            if worker.first != READY + "\n":
                if not worker.first:
                    worker.process.wait(5)
                    raise worker.failure("exited before it was ready")
                raise worker.failure(f"printed {worker.first!r} instead of {READY!r}")
        start = time.time() + lead
        line = json.dumps({"start": start}) + "\n"
        for worker in self._workers:
            stdin = worker.process.stdin
            assert stdin is not None
            try:
                stdin.write(line)
                stdin.close()
            except OSError as exc:  # BrokenPipeError: it died after saying ready
                raise worker.failure(f"could not be released ({exc})") from exc
        return start

    def results(self, *, timeout: float) -> list[dict[str, Any]]:
        """Each worker's JSON result, once all have exited (``timeout`` s for all of them)."""
        deadline = time.monotonic() + timeout
        results = []
        for worker in self._workers:
            if not worker.done.wait(max(0.0, deadline - time.monotonic())):
                raise worker.failure(f"was still running {timeout:g} s after the release")
            try:
                code = worker.process.wait(max(5.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise worker.failure("closed its stdout but did not exit") from exc
            if code != 0:
                raise worker.failure(f"failed; stdout: {worker.rest[-2000:]!r}")
            try:
                results.append(json.loads(worker.rest))
            except ValueError as exc:
                raise worker.failure(f"printed no JSON result: {worker.rest[-2000:]!r}") from exc
        return results

    def close(self) -> None:
        """Kill the workers still running and release their pipes and files."""
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.kill()
        for worker in self._workers:
            worker.process.wait()
            worker.reader.join(5)
            for stream in (worker.process.stdin, worker.process.stdout, worker.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):  # a line left unflushed to a dead worker
                        stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def run_together(
    commands: Sequence[Sequence[str]], *, env: Mapping[str, str], timeout: float
) -> list[dict[str, Any]]:
    """Start ``commands``, release them together, return their JSON results in order.

    ``timeout`` bounds the run after the release (starting is bounded by ``READY_TIMEOUT``).
    """
    with Together(commands, env=env) as together:
        together.release()
        return together.results(timeout=timeout)
