"""Triton kernel compiles in this process: how many, how long, which kernels, and whether the
worker was already serving.

Triton compiles a kernel on the first launch of each specialization: its constexprs, and (by
default) whether each integer argument and pointer is a multiple of 16 (some versions also
single out an integer equal to 1). A batch or context that gives
an argument a new class compiles the kernel again in the middle of serving, on the thread that
launched it, and that step waits (hundreds of ms on a GPU host; a cached binary loads in a few)
— a stall every stream then shows as one long token gap. On the 2026-12-07 H100 run a semi-PD
decode lane's ``forward`` took 951 ms once at 144 req/s (that rate's ITL p99 960 ms; 96-183 ms
in the other runs at that rate), with the engine's graphs captured at start: this says whether
such a stall was a compile. ``serving()`` is process-wide: a process that starts a second
worker after the first serves (tests) logs that one's start-up compiles too.

``install()`` sets Triton's ``jit_cache_hook`` (called before a compile, or before loading one
from the on-disk cache) and ``jit_post_compile_hook`` (after it), chaining any hooks already
set. Each compile is timed on its thread and recorded as the phase ``kernel_compile`` of the
``PhaseTimes`` given (a worker's ``delivery``: its ``delivery_times``), counted in ``totals()``
(a worker's heartbeat: ``kvrelay_kernel_compiles_total`` / ``..._seconds_total`` on /metrics),
and, once ``serving()`` was called, logged as a warning naming the kernel and its arguments'
classes. Without Triton, or with an older one lacking the hooks, ``install`` returns False and
nothing is counted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvrelay.workers.engine.phase_times import PhaseTimes

log = logging.getLogger(__name__)

PHASE = "kernel_compile"
# ``totals()``'s keys: a worker's heartbeat carries them in ``EngineStats.extra``, the controller
# turns them into counters (cluster/controller/health.py)
COUNT_KEY, SECONDS_KEY = "kernel_compiles", "kernel_compile_seconds"
LAST = 32  # compiles kept for ``recent()``


@dataclass(frozen=True, slots=True)
class Compile:
    kernel: str  # the kernel's qualified name
    seconds: float
    thread: str
    serving: bool  # after ``serving()``: the compile stalled a step that was serving requests
    signature: str  # Triton's repr: options and each argument's specialization


class KernelCompiles:
    """Thread-safe; one per process (``COMPILES``): Triton's hooks are process-wide."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sinks: list[PhaseTimes] = []
        self._recent: list[Compile] = []
        self.count = 0
        self.seconds = 0.0
        self.serving_count = 0
        self._serving = False
        self._installed = False
        self._prev_cache: Any = None
        self._prev_post: Any = None

    # ---- setup -----------------------------------------------------------------------------
    def install(self, sink: PhaseTimes | None = None) -> bool:
        """Hook Triton (once per process) and add ``sink`` to the ``PhaseTimes`` each compile
        is recorded in; False when this Triton has no such hooks (nothing is counted)."""
        with self._lock:
            if sink is not None and all(s is not sink for s in self._sinks):
                self._sinks.append(sink)
            if self._installed:
                return True
            try:
                from triton import knobs
            except ImportError:
                return False
            runtime: Any = getattr(knobs, "runtime", None)
            if not all(hasattr(runtime, h) for h in ("jit_cache_hook", "jit_post_compile_hook")):
                return False
            self._prev_cache = runtime.jit_cache_hook
            self._prev_post = runtime.jit_post_compile_hook
            runtime.jit_cache_hook = self._before
            runtime.jit_post_compile_hook = self._after
            self._installed = True
            return True

    def serving(self) -> None:
        """From now on a compile stalls a serving step: it is logged as a warning."""
        self._serving = True

    # ---- Triton's hooks (keyword arguments as Triton passes them) --------------------------
    def _before(self, **kw: Any) -> bool | None:
        # one start per thread, overwritten by the next: a compile that raised (no post hook)
        # leaves nothing behind to be read as the next one's start
        self._local.start = time.perf_counter()
        if self._prev_cache is not None and self._prev_cache(**kw):
            self._local.start = None  # the earlier hook skips this compile: no post hook follows
            return True
        return None

    def _after(self, **kw: Any) -> bool | None:
        start = getattr(self._local, "start", None)
        if start is not None:  # else a compile that began before ``install``
            self._local.start = None
            fn = kw.get("fn")
            name = getattr(fn, "name", None) or str(getattr(fn, "jit_function", "?"))
            self.record(name, time.perf_counter() - start, str(kw.get("repr", "")))
        if self._prev_post is not None:
            return self._prev_post(**kw)
        return None

    # ---- figures ---------------------------------------------------------------------------
    def record(self, kernel: str, seconds: float, signature: str = "") -> Compile:
        """One compile of ``kernel`` that took ``seconds`` on this thread."""
        c = Compile(kernel, seconds, threading.current_thread().name, self._serving, signature)
        with self._lock:
            self.count += 1
            self.seconds += seconds
            self.serving_count += c.serving
            self._recent = [*self._recent[-(LAST - 1) :], c]
            sinks = list(self._sinks)
        for s in sinks:
            s.add(PHASE, seconds)
        if c.serving:
            log.warning(
                "kernel %s compiled while serving: %.0f ms on thread %s (%s)",
                kernel, seconds * 1e3, c.thread, signature,
            )  # fmt: skip
        return c

    def totals(self) -> dict[str, float]:
        """Since the process started: compiles and their seconds."""
        with self._lock:
            return {COUNT_KEY: float(self.count), SECONDS_KEY: self.seconds}

    def recent(self) -> list[Compile]:
        """The last ``LAST`` compiles, oldest first."""
        with self._lock:
            return list(self._recent)


COMPILES = KernelCompiles()
