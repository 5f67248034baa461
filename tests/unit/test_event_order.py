"""The controller applies each worker's event deliveries in the order the worker numbered them
(cluster/controller/event_order.py), whatever order the actor runs them in, and the sink numbers
them from 0 across pickling (cluster/runtime/actors.py)."""

from __future__ import annotations

import pickle
import random
from typing import Any

from kvrelay.cluster.controller.event_order import EventOrder
from kvrelay.cluster.runtime.actors import _ControllerSink
from kvrelay.workers.types import TokenEvent


def _step(i: int) -> list[TokenEvent]:
    return [TokenEvent("r0", (i,)), TokenEvent("r1", (100 + i,))]


def test_deliveries_are_applied_in_their_numbered_order() -> None:
    rng = random.Random(5)
    for _ in range(50):
        order = EventOrder()
        arrivals = list(range(12))
        rng.shuffle(arrivals)
        applied: list[TokenEvent] = []
        for seq in arrivals:
            applied += order.accept("w", seq, _step(seq))
            applied += order.accept("v", seq, [])  # another worker's numbering is its own
        assert applied == [e for i in range(12) for e in _step(i)]
        assert order.waiting("w") == 0


def test_an_early_delivery_waits_and_a_stale_number_is_not_lost() -> None:
    order = EventOrder()
    assert order.accept("w", 1, _step(1)) == []  # delivery 0 not here yet
    assert order.waiting("w") == 1
    assert order.accept("w", 0, _step(0)) == _step(0) + _step(1)
    assert order.accept("w", 0, _step(9)) == _step(9)  # below the expected number: applied
    order.forget("w")
    assert order.waiting("w") == 0 and order.accept("w", 0, _step(0)) == _step(0)


class _Remote:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    def remote(self, *args: Any) -> None:
        self.calls.append(args)


class _Controller:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.on_events_pickled = _Remote(self.calls)


def test_the_sink_numbers_its_deliveries_from_zero_after_pickling() -> None:
    sink = _ControllerSink(_Controller())
    sink("w", _step(0))
    copy = pickle.loads(pickle.dumps(sink))  # as the worker receives it
    copy("w", _step(0))
    copy("w", _step(1))
    # the copy carries the controller's record of the original's call (number 0), then its own
    assert [c[2] for c in copy.controller.calls] == [0, 0, 1]
    assert [c[2] for c in sink.controller.calls] == [0]
    sink("w", _step(1))
    assert [c[2] for c in sink.controller.calls] == [0, 1]
    # the events go pickled (the controller actor's ``on_events_pickled`` loads them)
    assert [pickle.loads(c[1]) for c in sink.controller.calls] == [_step(0), _step(1)]
