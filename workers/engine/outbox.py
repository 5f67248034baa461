"""Hands an engine loop's events to its sink on a sender thread, in order.

The loop thread only appends a step's events (``put``); the sender calls ``sink`` with what is
queued, oldest first. When it has fallen behind, consecutive queued steps go out in one call
(their events concatenated in step order), so a slow sink costs fewer calls, not a growing
queue. ``flush`` waits until everything put so far has been handed over: the loop calls it
before every command, which keeps the order commands rely on (module doc of ``loop.py``).

``times`` (a ``PhaseTimes``, optional): per call of ``sink``, ``outbox_wait`` (from the oldest
step's ``put`` to the call: the sender's lag, a sink still busy or a GIL held elsewhere) and
``sink_call`` (the call itself: pickling, the sink's pacing, handing the events to Ray). With the
controller's and the driver's hops (``Controller.delivery``, ``RemoteBackend.delivery``) they say
where a token's time between the engine and the client goes.

A sink that raises stops the sender: the error is kept (``error``), later ``put``s are dropped
and ``flush`` raises it, so the loop thread fails at its next command or step. ``close`` hands
over what is queued and ends the sender; nothing put after that goes out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.types import TokenEvent

log = logging.getLogger(__name__)


def name_os_thread(name: str) -> None:
    """Name the calling thread where the OS shows it (Linux: ``/proc/<pid>/task/<tid>/comm``,
    15 bytes), so that per-thread CPU figures (``serve_path_bench --threads``) tell a worker's
    engine thread from its sender thread; Python 3.11 names only its own thread object. Does
    nothing where that file cannot be written."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:
        pass


class Outbox:
    def __init__(
        self,
        sink: Callable[[list[TokenEvent]], None],
        *,
        name: str,
        times: PhaseTimes | None = None,
    ) -> None:
        self._sink = sink
        self._times = times
        self._queued: list[list[TokenEvent]] = []  # steps not handed over yet, oldest first
        self._oldest = 0.0  # when the oldest queued step was put (monotonic s)
        self._sending = False  # the sender is inside sink()
        self._closed = False
        self._finished = False  # the sender has ended (closed and drained)
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-events", daemon=True)
        self._thread.start()

    def put(self, events: list[TokenEvent]) -> None:
        with self._cond:
            if self.error is None and not self._finished:
                if not self._queued:
                    self._oldest = time.monotonic()
                self._queued.append(events)
                self._cond.notify_all()

    def check(self) -> None:
        """Raise the sink's error, if it raised."""
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Wait until every event put so far is handed to the sink (or the sink failed)."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self.error is not None or self._finished or not (self._queued or self._sending)
                )
            )
        self.check()

    def close(self, timeout: float) -> None:
        """Hand over what is queued, then end the sender; wait for that up to ``timeout`` s."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        name_os_thread("kvrelay-events")
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued or self._closed)
                if not self._queued:  # closed and drained
                    self._finished = True
                    self._cond.notify_all()
                    return
                steps, self._queued = self._queued, []
                self._sending = True
                oldest = self._oldest
            events = steps[0] if len(steps) == 1 else [e for s in steps for e in s]
            start = time.monotonic()
            try:
                self._sink(events)
            except BaseException as exc:  # the loop thread fails on it (check / flush)
                log.exception("event sink failed")
                with self._cond:
                    self.error = exc
                    self._queued.clear()
                    self._sending = False
                    self._cond.notify_all()
                return
            if self._times is not None:
                self._times.add("outbox_wait", start - oldest)
                self._times.add("sink_call", time.monotonic() - start)
            with self._cond:
                self._sending = False
                self._cond.notify_all()
