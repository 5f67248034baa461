"""A worker's event sink over a real Ray actor (cluster/runtime/actors.py ``_ControllerSink``
with ``in_flight=2``, fed by workers/engine/outbox.py as the worker feeds it): a controller whose
loop is busy gets the steps that queued meanwhile as one call, in step order; a dead one never
holds the worker (its calls fail, and count as answered)."""

from __future__ import annotations

import pickle
import time
from typing import Any

import ray

from kvrelay.cluster.runtime.actors import _ControllerSink
from kvrelay.workers.engine.outbox import Outbox
from kvrelay.workers.types import TokenEvent


@ray.remote
class _BusyController:
    """``on_events_pickled`` holds the actor's loop for ``busy_s`` (a controller whose loop
    falls behind), then records the delivery."""

    def __init__(self, busy_s: float) -> None:
        self.busy_s = busy_s
        self.deliveries: list[tuple[int, list[TokenEvent]]] = []

    async def on_events_pickled(
        self, worker_id: str, blob: bytes, seq: int, sent_at: float | None = None
    ) -> None:
        end = time.monotonic() + self.busy_s
        while time.monotonic() < end:  # the loop is busy (CPU): the next call waits behind it
            pass
        self.deliveries.append((seq, pickle.loads(blob)))

    async def recorded(self) -> list[tuple[int, list[TokenEvent]]]:
        return self.deliveries


def _step(i: int) -> list[TokenEvent]:
    return [TokenEvent("r0", (i,)), TokenEvent("r1", (1000 + i,))]


def _feed(sink: Any, steps: int, every_s: float) -> None:
    outbox = Outbox(lambda events: sink("w", events), name="test")
    for i in range(steps):
        outbox.put(_step(i))
        time.sleep(every_s)
    outbox.close(30)


def test_a_busy_controller_gets_the_queued_steps_as_one_call_in_order(ray_session: None) -> None:
    steps = 40
    paced = _BusyController.remote(0.05)  # type: ignore[attr-defined]
    _feed(_ControllerSink(paced, in_flight=2), steps, every_s=0.005)
    unpaced = _BusyController.remote(0.05)  # type: ignore[attr-defined]
    _feed(_ControllerSink(unpaced), steps, every_s=0.005)
    want = [e for i in range(steps) for e in _step(i)]
    for handle in (paced, unpaced):
        # the outbox's close hands everything over; wait until the actor ran every call
        deadline = time.monotonic() + 60
        while True:
            got = ray.get(handle.recorded.remote())
            if sum(len(events) for _, events in got) == len(want) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # an async actor may run a caller's calls out of order: the controller puts them back
        # in their numbered order (event_order.py), as here
        got.sort(key=lambda d: d[0])
        assert [seq for seq, _ in got] == list(range(len(got)))
        assert [e for _, events in got for e in events] == want  # every event, in step order
        if handle is paced:
            # ~0.2 s of steps against 50 ms a call: a handful of calls, not one a step
            assert len(got) <= steps // 4, len(got)
            paced_calls = len(got)
        else:
            assert len(got) > 2 * paced_calls, (len(got), paced_calls)


def test_a_dead_controller_never_holds_the_sink(ray_session: None) -> None:
    handle = _BusyController.remote(0.0)  # type: ignore[attr-defined]
    sink = _ControllerSink(handle, in_flight=1, wait_s=5.0)
    sink("w", _step(0))
    ray.get(handle.recorded.remote())
    ray.kill(handle, no_restart=True)
    t0 = time.monotonic()
    for i in range(1, 5):  # each waits for the one before, which fails at once
        sink("w", _step(i))
    assert time.monotonic() - t0 < 4.0  # far below one wait_s per call
