"""``HandoffClock`` (workers/semi_pd/lanes.py): each request's handoff inside a semi-PD worker
in parts, on the decode lane's phase times; what never reaches its first decode event is
dropped, not kept (the worker's own runs: tests/integration/semi_pd/test_semi_pd.py)."""

from __future__ import annotations

import pytest

from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.semi_pd.lanes import HandoffClock
from kvrelay.workers.types import TokenEvent


def test_the_parts_add_up_once_a_request() -> None:
    times = PhaseTimes()
    clock = HandoffClock(times)
    for rid in ("a", "b", "c"):
        clock.handed(rid)
    clock.adopted("a")
    clock.adopted("b")
    clock.adopted("z")  # never handed over (a handoff from another worker): no figure
    clock.forget("b")  # aborted after its adoption
    clock.emitted([TokenEvent("a", (5,)), TokenEvent("b", (6,)), TokenEvent("c", (7,))])
    clock.emitted([TokenEvent("a", (8,))])  # its second decode event: nothing more
    got = times.summary()
    assert {p: got[p]["count"] for p in ("adopt_wait", "first_decode", "handoff_gap")} == {
        "adopt_wait": 2, "first_decode": 1, "handoff_gap": 1}  # fmt: skip
    assert got["handoff_gap"]["total_s"] >= got["first_decode"]["total_s"] >= 0
    clock.adopted("c")  # c's event above came before its adoption: it waits for its next one
    clock.emitted([TokenEvent("c", (9,))])
    assert times.summary()["first_decode"]["count"] == 2


def test_pending_clocks_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HandoffClock, "KEPT", 3)
    clock = HandoffClock(PhaseTimes())
    for i in range(3):
        clock.handed(f"r{i}")
    clock.handed("r3")  # the fourth: the three before it are dropped
    for i in range(4):
        clock.adopted(f"r{i}")
    assert clock.times.summary()["adopt_wait"]["count"] == 1
