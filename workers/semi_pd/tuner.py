"""Feeds semi-PD's split rule (split_rule.py) from a semi-PD worker's own events: the adapter
around the pure rule (it owns the clock and the samples; the rule owns the decision).

Samples: TTFT = submit to first token inside the worker (and, for a request still waiting when
the window closes, its wait so far: a lower bound, so a step shows in its first window); TPOT =
the gap between a request's successive decode-lane tokens. A window lasts ``window_s`` seconds of the clock: the first
``tick`` (either lane's, after a step) past that closes it, and its p_SLO TTFT and TPOT, arrival
rate and mean prefill time per request (prompt tokens over the prefill lane's measured rate)
become a ``Window``, from which ``decide`` gives the next split. p_SLO is p99 by default: the
SLOs the benchmarks score are p99s, and a decode ITL p99 that spikes while the p90 stays low
(the H100 runs: p90 10 ms, p99 50-67 ms) is the failure the rule exists for. Every window is
logged (``log``: measurements, the decision, the fits' predictions), not only the changes. A window in seconds, not in
decode steps, so that a load step is answered within ``window_s`` whatever the decode lane's
pace, also while it idles (the prefill lane ticks too). The worker applies a changed split at
both lanes' next iteration boundaries. Thread-safe: the prefill lane, the decode lane and the
callers of ``submit`` report concurrently.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvrelay.workers.semi_pd.sm_partition import Split
from kvrelay.workers.semi_pd.split_rule import Decision, SplitRuleConfig, Window, decide


@dataclass(frozen=True, slots=True)
class SplitChange:
    at_s: float  # clock time the window closed
    old: Split
    new: Split
    window: Window
    reason: str


@dataclass(frozen=True, slots=True)
class WindowLog:
    at_s: float  # clock time the window closed
    window: Window
    decision: Decision
    samples: tuple[int, int]  # TTFT and TPOT samples the window's percentiles came from


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values (nothing measured: the SLO is met)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


class SplitTuner:
    def __init__(
        self,
        config: SplitRuleConfig,
        *,
        window_s: float = 1.0,
        quantile: float = 0.99,  # p_SLO
        clock: Callable[[], float] = time.monotonic,
        log_windows: int = 3600,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.config = config
        self.window_s = window_s
        self.quantile = quantile
        self._clock = clock
        self._lock = threading.Lock()
        self._submitted: dict[str, float] = {}  # request -> submit time, until its first token
        self._last_token: dict[str, float] = {}  # request -> its last decode-lane token time
        self._ttft: list[float] = []
        self._tpot: list[float] = []
        self._arrivals = 0
        self._prompt_tokens = 0
        self._opened = clock()
        self.windows: list[Window] = []  # the last ``history`` (what the rule fits)
        self.windows_closed = 0
        self.changes: list[SplitChange] = []  # the log of every split the rule changed
        self.log: deque[WindowLog] = deque(maxlen=log_windows)  # every window, newest last

    def on_submit(self, request_id: str, prompt_tokens: int) -> None:
        with self._lock:
            self._submitted[request_id] = self._clock()
            self._arrivals += 1
            self._prompt_tokens += prompt_tokens

    def on_first_token(self, request_id: str, finished: bool = False) -> None:
        now = self._clock()
        with self._lock:
            t0 = self._submitted.pop(request_id, None)
            if t0 is not None:
                self._ttft.append(now - t0)
            if not finished:
                self._last_token[request_id] = now

    def on_token(self, request_id: str, finished: bool) -> None:
        now = self._clock()
        with self._lock:
            last = self._last_token.pop(request_id, None)
            if last is not None:
                self._tpot.append(now - last)
            if not finished:
                self._last_token[request_id] = now

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._submitted.pop(request_id, None)
            self._last_token.pop(request_id, None)

    def tick(self, split: Split, prefill_tokens_per_s: float | None) -> Decision | None:
        """After a lane's step: once ``window_s`` has passed, close the window and return the
        rule's decision for the next (None while the window is open)."""
        now = self._clock()
        with self._lock:
            span = now - self._opened
            if span < self.window_s:
                return None
            per_request = self._prompt_tokens / self._arrivals if self._arrivals else 0.0
            # a request still waiting for its first token has waited this long at least: a
            # burst whose prompts outlast the window shows in it, not only once they finish
            waiting = [now - t0 for t0 in self._submitted.values()]
            window = Window(
                split,
                ttft_s=percentile(self._ttft + waiting, self.quantile),
                tpot_s=percentile(self._tpot, self.quantile),
                arrival_rate=self._arrivals / span,
                prefill_s=per_request / prefill_tokens_per_s if prefill_tokens_per_s else 0.0,
            )
            samples = (len(self._ttft) + len(waiting), len(self._tpot))
            self._ttft, self._tpot = [], []
            self._arrivals = self._prompt_tokens = 0
            self._opened = now
            self.windows.append(window)
            self.windows_closed += 1
            del self.windows[: -self.config.history]
            decision = decide(self.config, self.windows)
            self.log.append(WindowLog(now, window, decision, samples))
            if decision.split != split:
                self.changes.append(
                    SplitChange(now, split, decision.split, window, decision.reason)
                )
            return decision

    def _wall_offset(self) -> float:
        """Seconds to add to this tuner's clock for ``time.time`` (benchmarks place the
        records on their own timelines)."""
        return time.time() - self._clock()

    def change_records(self) -> list[dict[str, Any]]:
        """The changes, oldest first, in wall-clock seconds: when, the old and new split, the
        reason, and the window's p99 TTFT, TPOT and arrival rate."""
        offset = self._wall_offset()
        return [
            {
                "t": c.at_s + offset,
                "old": [c.old.prefill, c.old.decode],
                "new": [c.new.prefill, c.new.decode],
                "reason": c.reason,
                "ttft_s": c.window.ttft_s,
                "tpot_s": c.window.tpot_s,
                "arrival_rate": c.window.arrival_rate,
            }
            for c in list(self.changes)
        ]

    def window_records(self) -> list[dict[str, Any]]:
        """Every window logged, oldest first, in wall-clock seconds: its p99 TTFT and TPOT
        against the SLOs, the split it ran under and the next, the fits and their predictions
        at both, and the reason."""
        offset, cfg = self._wall_offset(), self.config
        out = []
        for e in list(self.log):
            d = e.decision
            out.append(
                {
                    "t": e.at_s + offset,
                    "old": [e.window.split.prefill, e.window.split.decode],
                    "new": [d.split.prefill, d.split.decode],
                    "ttft_s": e.window.ttft_s,
                    "tpot_s": e.window.tpot_s,
                    "samples": list(e.samples),
                    "ttft_slo_s": cfg.ttft_slo_s,
                    "tpot_slo_s": cfg.tpot_slo_s,
                    "arrival_rate": e.window.arrival_rate,
                    "prefill_s": e.window.prefill_s,
                    "ttft_fit": [d.ttft_fit.a, d.ttft_fit.b, d.ttft_fit.lam],
                    "tpot_fit": [d.tpot_fit.a, d.tpot_fit.b],
                    "predicted_old": list(d.predicted(e.window.split)),
                    "predicted_new": list(d.predicted(d.split)),
                    "reason": d.reason,
                }
            )
        return out
