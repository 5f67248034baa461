"""EngineLoop's event delivery on a real engine (the tiny 2-layer model, CPU): the sender thread
hands the steps' events over in order, and a command never runs before every earlier event
(a settle's included) reached the sink; a failing sink ends the loop; stop drains the queue.

The sink here can be held shut (``Gate``) so that the sender falls behind the engine: that is
the state in which an ordering mistake would show.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.engine.outbox import Outbox
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.sequence import PLACEHOLDER
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
WAIT_S = 60.0


class Gate:
    """A sink that records every call (its thread, its events) and, while shut, blocks."""

    def __init__(self, raise_on_open: bool = False) -> None:
        self.calls: list[tuple[str, list[TokenEvent]]] = []
        self.open = threading.Event()
        self.entered = threading.Event()
        self.raise_on_open = raise_on_open
        self._lock = threading.Lock()

    def __call__(self, events: list[TokenEvent]) -> None:
        self.entered.set()
        assert self.open.wait(WAIT_S)
        if self.raise_on_open:
            raise ValueError("sink broke")
        with self._lock:
            self.calls.append((threading.current_thread().name, list(events)))

    def tokens(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        with self._lock:
            for _, events in self.calls:
                for e in events:
                    out.setdefault(e.request_id, []).extend(e.token_ids)
        return out


def wait_until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def engine(tiny: LoadedModel, overlap: bool = False) -> Engine:
    return Engine(
        tiny,
        EngineConfig(
            num_blocks=256, max_num_batched_tokens=48, cpu_num_blocks=0, overlap_schedule=overlap
        ),
    )


def add(loop: EngineLoop, n: int, params: SamplingParams = LONG) -> list[str]:
    """``n`` requests in one command (a later command would wait for a held sink)."""
    rids = [f"r{i}" for i in range(n)]

    def add_all(e: Engine) -> None:
        for i, rid in enumerate(rids):
            e.add_request(rid, list(range(50 + i, 70 + i)), params)

    loop.call(add_all)
    return rids


def emitted(e: Engine) -> dict[str, list[int]]:
    """What the engine has emitted so far for its live requests (on the loop thread)."""
    return {rid: list(s.output_ids) for rid, s in e.seqs.items()}


def lag(loop: EngineLoop, gate: Gate, steps: int = 3) -> None:
    """Let the engine run ``steps`` steps past the first sink call, which the gate holds."""
    assert gate.entered.wait(WAIT_S)
    at = loop.engine.steps
    wait_until(lambda: loop.engine.steps >= at + steps)


@pytest.mark.parametrize("sender", [True, False])
def test_events_arrive_in_step_order_with_the_plain_engines_tokens(
    tiny: LoadedModel, sender: bool
) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = engine(tiny)
    prompts = {f"r{i}": list(range(50 + i, 70 + i)) for i in range(4)}
    for rid, p in prompts.items():
        plain.add_request(rid, p, greedy)
    want: dict[str, list[int]] = {rid: [] for rid in prompts}
    while plain.has_unfinished():
        for ev in plain.step():
            want[ev.request_id].extend(ev.token_ids)

    gate = Gate()
    gate.open.set()
    loop = EngineLoop(engine(tiny), gate, name="eng", sender=sender).start()
    add(loop, 4, greedy)
    wait_until(lambda: sum(map(len, gate.tokens().values())) == 4 * 24)
    loop.stop()
    assert gate.tokens() == want
    finished = [e.request_id for _, evs in gate.calls for e in evs if e.finish_reason]
    assert sorted(finished) == sorted(prompts)  # each finishes once, after its last token
    assert {name for name, _ in gate.calls} == {"eng-events" if sender else "eng"}


def test_a_command_runs_after_every_earlier_event_was_handed_over(tiny: LoadedModel) -> None:
    gate = Gate()
    loop = EngineLoop(engine(tiny), gate, name="eng").start()
    try:
        add(loop, 3)
        lag(loop, gate)  # the sender holds step 1's events; later steps queue behind it
        seen: Future[tuple[dict[str, list[int]], dict[str, list[int]]]] = loop.submit(
            lambda e: (emitted(e), gate.tokens())
        )
        gate.open.set()
        engine_had, sink_had = seen.result(WAIT_S)
        assert engine_had == sink_had and all(len(t) >= 3 for t in sink_had.values())
        # the queued steps went out together: one call carries a request's tokens of >1 step
        assert any(len([e for e in evs if e.request_id == "r0"]) > 1 for _, evs in gate.calls)
    finally:
        loop.stop()


def test_a_settle_command_sees_the_step_in_flight_delivered(tiny: LoadedModel) -> None:
    gate = Gate()
    loop = EngineLoop(engine(tiny, overlap=True), gate, name="eng").start()
    try:
        add(loop, 3)
        lag(loop, gate)

        def read(e: Engine) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
            return emitted(e), gate.tokens()

        seen = loop.submit(read, settle=True)
        gate.open.set()
        engine_had, sink_had = seen.result(WAIT_S)
        assert all(PLACEHOLDER not in t for t in engine_had.values())  # nothing in flight
        assert engine_had == sink_had
    finally:
        loop.stop()


def test_a_failing_sink_ends_the_loop_and_fails_pending_commands(tiny: LoadedModel) -> None:
    gate = Gate(raise_on_open=True)
    loop = EngineLoop(engine(tiny), gate, name="eng").start()
    add(loop, 2)
    lag(loop, gate, steps=1)
    pending = loop.submit(lambda e: len(e.seqs))
    gate.open.set()
    with pytest.raises(RuntimeError, match="engine loop stopped"):
        pending.result(WAIT_S)
    wait_until(lambda: not loop.alive)
    assert isinstance(loop.error, ValueError)
    with pytest.raises(RuntimeError, match="sink broke"):
        loop.call(lambda e: None)
    loop.stop()
    assert not [t for t in threading.enumerate() if t.name in ("eng", "eng-events")]


def test_stop_hands_over_what_was_queued(tiny: LoadedModel) -> None:
    gate = Gate()
    loop = EngineLoop(engine(tiny), gate, name="eng").start()
    add(loop, 3)
    lag(loop, gate)
    stopper = threading.Thread(target=loop.stop, args=(WAIT_S,))
    stopper.start()
    wait_until(lambda: not loop.alive)  # the loop ended; its events wait behind the gate
    gate.open.set()
    stopper.join(WAIT_S)
    assert not stopper.is_alive()
    # the loop is stopped: its engine can be read from here
    assert gate.tokens() == emitted(loop.engine) and loop.engine.steps > 3
    assert not [t for t in threading.enumerate() if t.name in ("eng", "eng-events")]


def test_finish_events_still_arrive_when_requests_end(tiny: LoadedModel) -> None:
    gate = Gate()
    gate.open.set()
    loop = EngineLoop(engine(tiny), gate, name="eng").start()
    try:
        rids = add(loop, 2, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        wait_until(
            lambda: (
                {e.request_id for _, evs in gate.calls for e in evs if e.finish_reason} == set(rids)
            )
        )
        reasons = {e.finish_reason for _, evs in gate.calls for e in evs if e.finish_reason}
        assert reasons == {FinishReason.LENGTH}
        loop.call(lambda e: e.check_integrity())
        assert loop.call(lambda e: e.stats().pool.used) == 0
    finally:
        loop.stop()


def test_two_loops_sharing_an_outbox_flush_it_before_a_command(tiny: LoadedModel) -> None:
    """The semi-PD lanes' arrangement: each loop's sink queues on one outbox (sender=False,
    shared_outbox); a command on either loop waits until both loops' earlier events went out,
    and each loop records its phases."""
    gate = Gate()
    shared = Outbox(gate, name="both")
    times = {n: PhaseTimes() for n in ("a", "b")}
    loops = {
        n: EngineLoop(
            engine(tiny), shared.put, name=n, sender=False, shared_outbox=shared, times=times[n]
        ).start()
        for n in ("a", "b")
    }
    try:
        for n, loop in loops.items():
            rids = [f"{n}{i}" for i in range(2)]

            def add_all(e: Engine, rids: list[str] = rids) -> None:
                for i, rid in enumerate(rids):
                    e.add_request(rid, list(range(50 + i, 70 + i)), LONG)

            loop.call(add_all)
        lag(loops["a"], gate)
        lag(loops["b"], gate, steps=2)  # both loops have put events the gate holds
        seen = loops["a"].submit(lambda e: (emitted(loops["a"].engine), gate.tokens()))
        gate.open.set()
        a_had, sink_had = seen.result(WAIT_S)
        # every token of loop a, and loop b's of its steps queued before the command, went out
        assert {r: t for r, t in sink_had.items() if r.startswith("a")} == a_had
        assert any(r.startswith("b") and t for r, t in sink_had.items())
        assert {name for name, _ in gate.calls} == {"both-events"}
    finally:
        for loop in loops.values():
            loop.stop()
        shared.close(WAIT_S)
    for t in times.values():
        s = t.summary()
        assert s["step"]["count"] >= 3 and s["lock_wait"]["count"] == s["step"]["count"]
        assert s["cycle"]["count"] >= 2 and s["command"]["count"] >= 1
        assert s["step"]["p50_ms"] <= s["cycle"]["max_ms"] * 1.1  # a step is part of a cycle
        # no guard gave a lock back: a step held its (null) lock throughout
        assert s["held"]["count"] == s["step"]["count"]
        # a step's thread CPU time beside its wall time (a lane's GIL and lock waits show as
        # the difference); the lock_wait is wall time only
        assert 0 < s["step"]["cpu_share"] <= 1.05 and "cpu_share" not in s["lock_wait"]
        assert s["held"]["total_s"] == pytest.approx(s["step"]["total_s"])


def test_a_loop_with_a_sender_takes_no_shared_outbox(tiny: LoadedModel) -> None:
    shared = Outbox(lambda events: None, name="x")
    try:
        with pytest.raises(ValueError, match="shared_outbox"):
            EngineLoop(engine(tiny), shared.put, shared_outbox=shared)
    finally:
        shared.close(WAIT_S)
