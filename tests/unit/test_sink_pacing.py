"""A worker's event sink keeps at most ``in_flight`` calls unanswered by the controller
(cluster/runtime/actors.py ``_ControllerSink``); the steps that come while it waits leave the
worker's outbox (workers/engine/outbox.py) as one call, in step order."""

from __future__ import annotations

import pickle
import threading
import time
from concurrent.futures import Future
from typing import Any

from kvrelay.cluster.runtime.actors import _ControllerSink
from kvrelay.workers.engine.outbox import Outbox
from kvrelay.workers.types import TokenEvent, events_from_bytes


def _step(i: int) -> list[TokenEvent]:
    return [TokenEvent("r0", (i,)), TokenEvent("r1", (100 + i,))]


class _Ref:
    def __init__(self, answer: Future[None]) -> None:
        self._answer = answer

    def future(self) -> Future[None]:
        return self._answer


class _Remote:
    """``on_events_pickled.remote``: records (events, seq) and hands out an answer the test
    completes (the controller ran the call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[TokenEvent], int]] = []
        self.answers: list[Future[None]] = []
        self.lock = threading.Lock()

    def remote(self, worker_id: str, blob: bytes, seq: int, sent_at: float) -> _Ref:
        with self.lock:
            self.calls.append((events_from_bytes(blob), seq))
            self.answers.append(Future())
            return _Ref(self.answers[-1])


class _Controller:
    def __init__(self) -> None:
        self.on_events_pickled = _Remote()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.on_events_pickled = _Remote()


def _wait_until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_third_call_waits_for_the_first_answer() -> None:
    ctl = _Controller()
    sink = _ControllerSink(ctl, in_flight=2)
    sink("w", _step(0))
    sink("w", _step(1))  # two unanswered: both went at once
    third = threading.Thread(target=sink, args=("w", _step(2)))
    third.start()
    time.sleep(0.05)
    assert len(ctl.on_events_pickled.calls) == 2  # waits for call 0's answer
    ctl.on_events_pickled.answers[0].set_result(None)
    third.join(5)
    assert [seq for _, seq in ctl.on_events_pickled.calls] == [0, 1, 2]
    # answered calls are forgotten: one more goes at once once call 1 is answered
    ctl.on_events_pickled.answers[1].set_result(None)
    sink("w", _step(3))
    assert [seq for _, seq in ctl.on_events_pickled.calls] == [0, 1, 2, 3]


def test_a_failed_call_counts_as_answered_and_a_silent_one_only_for_wait_s() -> None:
    ctl = _Controller()
    sink = _ControllerSink(ctl, in_flight=1, wait_s=0.1)
    sink("w", _step(0))
    ctl.on_events_pickled.answers[0].set_exception(RuntimeError("controller died"))
    sink("w", _step(1))  # at once: the failed call is not waited for
    t0 = time.monotonic()
    sink("w", _step(2))  # call 1 never answers (a hung controller): waits wait_s, then goes
    assert 0.09 <= time.monotonic() - t0 < 2.0
    assert [seq for _, seq in ctl.on_events_pickled.calls] == [0, 1, 2]


def test_without_a_bound_nothing_waits_and_a_copy_keeps_the_bound() -> None:
    ctl = _Controller()
    free = _ControllerSink(ctl)
    for i in range(5):  # nothing answered, nothing waited for
        free("w", _step(i))
    assert len(ctl.on_events_pickled.calls) == 5
    copy = pickle.loads(pickle.dumps(_ControllerSink(ctl, in_flight=2, wait_s=0.5)))
    assert (copy.in_flight, copy.wait_s) == (2, 0.5)
    copy("w", _step(0))
    assert [seq for _, seq in copy.controller.on_events_pickled.calls] == [0]


def test_steps_that_come_while_the_sink_waits_go_as_one_call_in_order() -> None:
    ctl = _Controller()
    sink = _ControllerSink(ctl, in_flight=2)
    outbox = Outbox(lambda events: sink("w", events), name="test")
    try:
        for i in range(2):  # one at a time: two steps queued together would go as one call
            outbox.put(_step(i))
            _wait_until(lambda n=i + 1: len(ctl.on_events_pickled.calls) == n)
        outbox.put(_step(2))  # the sender takes it and waits for call 0's answer
        time.sleep(0.05)
        for i in range(3, 7):  # queue behind the waiting sender
            outbox.put(_step(i))
        assert len(ctl.on_events_pickled.calls) == 2
        ctl.on_events_pickled.answers[0].set_result(None)
        _wait_until(lambda: len(ctl.on_events_pickled.calls) == 3)
        ctl.on_events_pickled.answers[1].set_result(None)
        _wait_until(lambda: len(ctl.on_events_pickled.calls) == 4)
        outbox.flush()
        calls = ctl.on_events_pickled.calls
        assert [seq for _, seq in calls] == [0, 1, 2, 3]
        assert [events for events, _ in calls] == [
            _step(0),
            _step(1),
            _step(2),
            [e for i in range(3, 7) for e in _step(i)],  # four steps, one call, step order
        ]
    finally:
        for answer in ctl.on_events_pickled.answers:
            if not answer.done():
                answer.set_result(None)
        outbox.close(5)
