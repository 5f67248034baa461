"""The delivery hops' clocks: the event sender's lag and sink calls (workers/engine/outbox.py) and
a mailbox's reader lag (cluster/controller/streams.py) are measured from the oldest item still
waiting, once per hand-over."""

from __future__ import annotations

import asyncio
import threading

from kvrelay.cluster.controller.streams import Mailbox
from kvrelay.workers.engine.outbox import Outbox
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.types import TokenEvent
from kvrelay_testing.clock import spin

HOLD_S = 0.03


def test_the_sender_times_its_lag_from_the_oldest_queued_step() -> None:
    times = PhaseTimes()
    entered, release = threading.Event(), threading.Event()
    calls: list[list[TokenEvent]] = []

    def sink(events: list[TokenEvent]) -> None:
        calls.append(events)
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)

    outbox = Outbox(sink, name="t", times=times)
    outbox.put([TokenEvent("a", (1,))])
    assert entered.wait(10)  # the first call is in the sink, held there
    outbox.put([TokenEvent("a", (2,))])  # the oldest of the next call
    spin(HOLD_S)
    outbox.put([TokenEvent("a", (3,))])
    release.set()
    outbox.close(10)
    assert [[e.token_ids for e in c] for c in calls] == [[(1,)], [(2,), (3,)]]
    summary = times.summary()
    assert summary["sink_call"]["count"] == summary["outbox_wait"]["count"] == 2
    # the second call waited for the first from step 2's put (not step 3's); the first call
    # lasted at least as long
    assert summary["outbox_wait"]["max_ms"] >= 1e3 * HOLD_S
    assert summary["sink_call"]["max_ms"] >= 1e3 * HOLD_S


def test_an_outbox_without_times_records_nothing() -> None:
    got: list[list[TokenEvent]] = []
    outbox = Outbox(got.append, name="t")
    outbox.put([TokenEvent("a", (1,))])
    outbox.close(10)
    assert got == [[TokenEvent("a", (1,))]]


def test_a_mailbox_times_its_reader_from_the_oldest_item() -> None:
    times = PhaseTimes()

    async def main() -> list[int]:
        box: Mailbox[int] = Mailbox(times, "wait")
        box.put(1)
        spin(HOLD_S)
        box.put(2)  # the box was not empty: the wait still counts from item 1
        first = await box.take()
        box.put(3)
        return first + await box.take()

    assert asyncio.run(main()) == [1, 2, 3]
    wait = times.summary()["wait"]
    assert wait["count"] == 2
    assert wait["max_ms"] >= 1e3 * HOLD_S
