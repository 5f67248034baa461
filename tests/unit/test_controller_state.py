"""The controller's registry and request table: one object, its invariants checked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.state import ControllerState, WorkerEntry
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent
from kvrelay.workers.worker import WorkerInfo


def _entry(wid: str, role: str = "decode") -> WorkerEntry:
    info = WorkerInfo(wid, role, "127.0.0.1", 1, "m", 16, 64, 1024, 2048)
    client: Any = SimpleNamespace(worker_id=wid)
    return WorkerEntry(client, info, role)


def _flight(rid: str) -> Flight:
    req = GenerateRequest(rid, "m", (1, 2, 3), SamplingParams(max_tokens=4))
    text: Any = SimpleNamespace()
    return Flight(req, text)


def test_pool_release_and_integrity() -> None:
    s = ControllerState()
    s.workers["p"], s.workers["d"] = _entry("p", "prefill"), _entry("d")
    s.workers["d"].draining = True
    assert [w.info.worker_id for w in s.pool("prefill", "decode")] == ["p"]
    f = s.flights["r1"] = _flight("r1")
    f.owner = "p"
    s.workers["p"].assigned.add("r1")
    assert s.check_integrity() == {"workers": 2, "flights": 1, "assigned": 1}
    s.release(f)
    assert s.check_integrity() == {"workers": 2, "flights": 0, "assigned": 0}


def test_integrity_names_what_is_broken() -> None:
    s = ControllerState()
    s.workers["p"] = _entry("p")
    s.workers["p"].assigned.add("ghost")
    with pytest.raises(AssertionError, match="ghost"):
        s.check_integrity()
    s.workers["p"].assigned.clear()
    s.flights["r"] = _flight("r")
    s.flights["r"].owner = "gone"
    with pytest.raises(AssertionError, match="unknown gone"):
        s.check_integrity()
    s.flights["r"].moving = 1  # a task is moving it: its owner may be dead meanwhile
    s.check_integrity()


def test_flight_hands_events_to_its_sink_once_attached() -> None:
    """Queued events (those that came while the request was being dispatched) go to the sink
    first, up to the last one, then each event as it comes; ``ended`` is done after the last;
    detached, events queue again."""

    async def main() -> None:
        flight = _flight("r")
        flight.emit(TokenEvent("r", (1,)))
        flight.emit(TokenEvent("r", (2,)))
        got: list[list[TokenEvent]] = []
        ended = flight.attach(got.append)
        assert [[e.token_ids for e in b] for b in got] == [[(1,), (2,)]]
        assert flight.queue.empty() and not ended.done()
        flight.emit(TokenEvent("r", (3,), finish_reason=FinishReason.LENGTH))
        assert [e.token_ids for e in got[-1]] == [(3,)] and ended.done()
        flight.detach()
        flight.emit(TokenEvent("r", (4,)))
        assert flight.queue.get_nowait().token_ids == (4,) and len(got) == 2

        late = _flight("q")
        late.emit(TokenEvent("q", (1,), finish_reason=FinishReason.STOP))
        late.emit(TokenEvent("q", (9,)))  # after the last: a queue reader never takes it
        seen: list[list[TokenEvent]] = []
        assert late.attach(seen.append).done()
        assert [[e.token_ids for e in b] for b in seen] == [[(1,)]]

        aborted = _flight("x")
        aborted.attach(seen.append)
        aborted.detach()
        aborted.finish(FinishReason.ABORT)  # the client went away: queued, not sent
        assert aborted.queue.get_nowait().finish_reason is FinishReason.ABORT
        assert len(seen) == 1

    asyncio.run(main())
