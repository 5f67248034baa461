"""Runs an engine on its own thread: commands in, one batch of events out per step.

Every engine call happens on the loop thread (the engine is not thread-safe). Other threads
``submit`` a function and get a ``concurrent.futures.Future`` for its result; commands run
between steps, so an abort takes effect before the next step. After each step the loop hands
that step's events, for all requests, to ``sink`` in one call (one message per worker step).
A command submitted with ``settle=True`` (it reads a request's tokens: park, migration) first
has the overlapped engine read its step in flight, and those events go to ``sink`` before it.

``lock``: held around every step and command (never around ``sink``), for engines that share
their KV storage with another loop's engine (``workers/semi_pd/``); None: no lock.
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
    ) -> None:
        self.engine = engine
        self.sink = sink
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
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put((lambda e: None, Future(), False))  # wake the loop
        self._thread.join(timeout)

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

    def _run_commands(self, block: bool) -> None:
        try:
            fn, fut, settle = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if settle:
                with self._lock:
                    events = self.engine.settle()
                if events:
                    self.sink(events)
            if fut.set_running_or_notify_cancel():
                try:
                    with self._lock:
                        result = fn(self.engine)
                    fut.set_result(result)
                except Exception as exc:  # the caller sees it on its future
                    fut.set_exception(exc)
            try:
                fn, fut, settle = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands(block=self.engine.idle or not self.engine.has_unfinished())
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    before = self.engine.prompt_tokens_computed
                    t0 = time.perf_counter()
                    with self._lock:
                        events = self.engine.step()
                    self._measure(self.engine.prompt_tokens_computed - before,
                                  time.perf_counter() - t0)
                    if events:
                        self.sink(events)
        except BaseException as exc:  # a broken engine must not die silently
            log.exception("engine loop failed")
            self.error = exc
        finally:
            self._fail_pending()

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
