"""Runs an engine on its own thread: commands in, the steps' events out, in order.

Every engine call happens on the loop thread (the engine is not thread-safe). Other threads
``submit`` a function and get a ``concurrent.futures.Future`` for its result; commands run
between steps, so an abort takes effect before the next step.

Events: with ``sender=True`` (the default) the loop thread only queues each step's events and
a sender thread hands them to ``sink`` (``outbox.py``): the sink's cost (pickling, an actor
call) stays off the step thread, where on the GPU it would add to the host's unhidden share of
a step. The sink then gets the events of one or more consecutive steps per call, in step order,
from the sender thread. With ``sender=False`` the loop thread calls ``sink`` after each step,
once per step (the semi-PD lanes, whose sinks act on their engines; debugging).

Order, either way: before any command runs, every event of the steps before it has been handed
to ``sink`` (the loop flushes the sender first). A command submitted with ``settle=True`` (it
reads a request's tokens: park, migration) first has the overlapped engine read its step in
flight, and those events reach ``sink`` before it too. A sink that raises ends the loop as a
failing step does (``error``; pending commands fail), at its next command or step.

``lock``: held around every step and command (never around ``sink``), for engines that share
their KV storage with another loop's engine (``workers/semi_pd/``); None: no lock.

``shared_outbox``: with ``sender=False``, an outbox that ``sink`` itself puts into (one sender
thread for two loops: the semi-PD lanes, whose sinks act on their engines on the loop thread and
leave the actor call to the sender). The loop flushes it before every command and fails on its
sink's error, as it does with its own outbox. ``times``: where the loop records how long each
step waited for ``lock`` (``lock_wait``), ran (``step``), held it (``held``: the step less the
time it gave the lock back, ``PhaseTimes.off_lock``), spent in ``sink`` (``sink``) and the
time from one step's end to the next's (``cycle``); commands as ``command``, and the waits of
an engine whose last step scheduled nothing while it had requests (``idle_wait``: until a
command comes, at most 0.5 s) (phase_times.py). ``delivery``: where the loop's own sender
records its lag and its calls of ``sink`` (``outbox.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.outbox import Outbox, name_os_thread
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.rates import prefill_rate, running_average
from kvrelay.workers.types import TokenEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
Sink = Callable[[list[TokenEvent]], None]


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        sink: Sink,
        *,
        name: str = "engine",
        lock: AbstractContextManager[object] | None = None,
        sender: bool = True,
        shared_outbox: Outbox | None = None,
        times: PhaseTimes | None = None,
        delivery: PhaseTimes | None = None,
    ) -> None:
        if sender and shared_outbox is not None:
            raise ValueError("shared_outbox is for a loop without a sender of its own")
        self.engine = engine
        self.sink = sink
        self._name = name
        self._sender = sender
        self._outbox: Outbox | None = None  # started with the loop
        self._shared_outbox = shared_outbox
        self.times = times
        self._delivery = delivery
        self._lock = lock if lock is not None else nullcontext()
        self._commands: queue.SimpleQueue[tuple[Callable[[Engine], Any], Future[Any], bool]] = (
            queue.SimpleQueue()
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        # measured prefill rate (EMA over prefill-heavy steps), read by the heartbeat: the
        # router's cost estimates use it instead of a constant
        self.prefill_tokens_per_s: float | None = None
        self.decode_step_s: float | None = None  # EMA over pure decode steps

    def start(self) -> EngineLoop:
        if self._sender:
            self._outbox = Outbox(self.sink, name=self._name, times=self._delivery)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop, then hand over the events it queued; both within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._commands.put((lambda e: None, Future(), False))  # wake the loop
        self._thread.join(timeout)
        if self._outbox is not None:
            self._outbox.close(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[Engine], T], *, settle: bool = False) -> Future[T]:
        fut: Future[T] = Future()
        if self.error is not None or self._stop.is_set():
            fut.set_exception(RuntimeError(f"engine loop stopped: {self.error!r}"))
            return fut
        self._commands.put((fn, fut, settle))
        return fut

    def call(
        self, fn: Callable[[Engine], T], timeout: float | None = 60.0, *, settle: bool = False
    ) -> T:
        return self.submit(fn, settle=settle).result(timeout)

    def _deliver(self, events: list[TokenEvent]) -> None:
        if self._outbox is not None:
            self._outbox.put(events)
        else:
            self.sink(events)

    def _outboxes(self) -> tuple[Outbox, ...]:
        return tuple(o for o in (self._outbox, self._shared_outbox) if o is not None)

    def _run_commands(self, block: bool) -> None:
        for outbox in self._outboxes():
            outbox.check()
        try:
            fn, fut, settle = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if self._stop.is_set():  # stopping: this command and those queued fail (_run)
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError("engine loop stopped"))
                return
            try:
                if settle:
                    with self._lock:
                        events = self.engine.settle()
                    if events:
                        self._deliver(events)
                for outbox in self._outboxes():
                    outbox.flush()  # the command sees every earlier event handed over
            except BaseException as exc:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError(f"engine loop stopped: {exc!r}"))
                raise
            if fut.set_running_or_notify_cancel():
                try:
                    t0 = time.perf_counter()
                    with self._lock:
                        result = fn(self.engine)
                    if self.times is not None:
                        self.times.add("command", time.perf_counter() - t0)
                    fut.set_result(result)
                except Exception as exc:  # the caller sees it on its future
                    fut.set_exception(exc)
            try:
                fn, fut, settle = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        name_os_thread("kvrelay-engine")
        last_end: float | None = None  # the previous step's end, for ``cycle``
        try:
            while not self._stop.is_set():
                unfinished = self.engine.has_unfinished()
                stalled = self.engine.idle and unfinished  # waits for a command or 0.5 s
                t = time.perf_counter()
                self._run_commands(block=self.engine.idle or not unfinished)
                if stalled and self.times is not None:
                    self.times.add("idle_wait", time.perf_counter() - t)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    before = self.engine.prompt_tokens_computed
                    if self.times is not None:
                        self.times.take_off_lock()  # a command's guards are not this step's
                    t0 = time.perf_counter()
                    with self._lock:
                        t1, c1 = time.perf_counter(), time.thread_time()
                        events = self.engine.step()
                    t2, c2 = time.perf_counter(), time.thread_time()
                    self._measure(self.engine.prompt_tokens_computed - before, t2 - t0)
                    if events:
                        self._deliver(events)
                    if self.times is not None:
                        t3 = time.perf_counter()
                        self._time_step(t0, t1, t2, t3, last_end, c2 - c1)
                        last_end = t3
                else:
                    last_end = None  # idle: the next step's wait is not a step's cycle
        except BaseException as exc:  # a broken engine must not die silently
            log.exception("engine loop failed")
            self.error = exc
        finally:
            self._fail_pending()
            if self._outbox is not None:
                self._outbox.close(0.0)  # the sender hands over what is queued, then ends

    def _time_step(
        self, t0: float, t1: float, t2: float, t3: float, last: float | None, step_cpu: float
    ) -> None:
        times = self.times
        assert times is not None
        times.add("lock_wait", t1 - t0)
        times.add("step", t2 - t1, step_cpu)
        # what the step held the lock for: its time less the guards' (workers/semi_pd/lanes.py)
        times.add("held", max(0.0, t2 - t1 - times.take_off_lock()))
        times.add("sink", t3 - t2)
        if last is not None:
            times.add("cycle", t3 - last)

    def _measure(self, prompt_tokens: int, seconds: float) -> None:
        rate = prefill_rate(prompt_tokens, seconds)
        if rate is not None:
            self.prefill_tokens_per_s = running_average(self.prefill_tokens_per_s, rate)
        elif prompt_tokens == 0 and seconds > 0:
            self.decode_step_s = running_average(self.decode_step_s, seconds)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, fut, _ = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("engine loop stopped"))
