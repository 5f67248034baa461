"""Applies the SLO-aware pool-sizing planner (cluster/sizing/pool_sizing.py) to a running cluster.

Every ``interval_s`` it measures the load (arrivals, mean prompt and output tokens over a
window), the workers' prefill rate and decode step time against batch size (from heartbeats),
asks ``size_pools`` for the prefill/decode split that best meets the TTFT and ITL SLOs, and
switches at most one worker's role per tick (between requests: a worker keeps serving what it
has; only new requests see the new role). Colocated workers are left alone.

Against flapping (seen in the goodput benchmark: five switches in 34 s on noisy decode fits):
a split is applied only once ``confirm_ticks`` consecutive ticks asked for it, and a prefill
worker with no measured rate yet (one just switched) counts at the pool's measured mean, not
at the routing default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from kvrelay.cluster.controller.state import ControllerState
from kvrelay.cluster.sizing.pool_sizing import DecodeProfile, SizingInput, size_pools
from kvrelay.workers.types import Role

log = logging.getLogger(__name__)
PREFILL, DECODE = Role.PREFILL.value, Role.DECODE.value  # roles as WorkerEntry.role holds them


@dataclass(frozen=True, slots=True)
class AutosizeConfig:
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.2
    interval_s: float = 10.0
    window_s: float = 60.0
    confirm_ticks: int = 2  # consecutive ticks that must ask for the same new split


class PrefillRates(Protocol):
    """Each worker's prefill speed as routing measures it (cluster/routing/adapter.py)."""

    def measured_tps(self, worker_id: str) -> float | None: ...

    def prefill_tps(self, worker_id: str) -> float: ...


class PoolAutosizer:
    def __init__(self, state: ControllerState, rates: PrefillRates, cfg: AutosizeConfig) -> None:
        self.state = state
        self.rates = rates
        self.cfg = cfg
        self.arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt, max_tokens)
        self.samples: deque[tuple[int, float]] = deque(maxlen=256)  # (batch, step seconds)
        self.switches: list[tuple[float, str, str, str]] = []
        self._pending: tuple[int, int] | None = None  # (prefill workers wanted, ticks in a row)

    def on_arrival(self, prompt_tokens: int, max_tokens: int) -> None:
        self.arrivals.append((time.monotonic(), prompt_tokens, max_tokens))

    def on_heartbeat(self, running: int, decode_step_s: float | None) -> None:
        if decode_step_s and running:
            self.samples.append((running, decode_step_s))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("pool sizing tick failed")

    async def tick(self) -> None:
        now = time.monotonic()
        while self.arrivals and self.arrivals[0][0] < now - self.cfg.window_s:
            self.arrivals.popleft()
        pools = {r: [w for w in self.state.workers.values() if w.healthy and not w.draining
                     and w.role == r] for r in (PREFILL, DECODE)}
        total = len(pools[PREFILL]) + len(pools[DECODE])
        if len(self.arrivals) < 4 or total < 2 or len(self.samples) < 4:
            return  # not enough measured to decide anything
        n = len(self.arrivals)
        batches = [float(b) for b, _ in self.samples]
        profile = (
            DecodeProfile.fit(batches, [s for _, s in self.samples])
            if len(set(batches)) > 1
            else DecodeProfile(max(1e-4, sum(s for _, s in self.samples) / len(self.samples)), 0.0)
        )
        measured = [r for w in pools[PREFILL]
                    if (r := self.rates.measured_tps(w.info.worker_id)) is not None]
        # an unmeasured prefill worker (just switched) counts at the pool's measured mean
        rates = measured or [self.rates.prefill_tps(w.info.worker_id) for w in pools[PREFILL]]
        split = size_pools(SizingInput(
            ttft_slo_s=self.cfg.ttft_slo_s,
            itl_slo_s=self.cfg.itl_slo_s,
            arrival_rate=n / self.cfg.window_s,
            mean_prompt_tokens=sum(p for _, p, _ in self.arrivals) / n,
            mean_output_tokens=sum(m for _, _, m in self.arrivals) / n,
            prefill_tps=sum(rates) / len(rates) if rates else self.rates.prefill_tps(""),
            decode=profile,
            total_workers=total,
        ))
        want = max(1, min(total - 1, split.prefill_workers))
        have = len(pools[PREFILL])
        if want == have:
            self._pending = None
            return
        ticks = self._pending[1] + 1 if self._pending and self._pending[0] == want else 1
        self._pending = (want, ticks)
        if ticks < self.cfg.confirm_ticks:
            return  # not yet: the same split must be asked for again
        self._pending = None
        src, dst = (DECODE, PREFILL) if want > have else (PREFILL, DECODE)
        victim = min(pools[src], key=lambda w: (len(w.assigned), w.info.worker_id))
        await victim.client.call("set_role", dst, timeout=30)
        victim.role = dst
        self.switches.append((time.time(), victim.info.worker_id, src, dst))
        log.info("pool sizing: %s %s -> %s (predicted ttft %.2fs itl %.3fs attainment %.2f)",
                 victim.info.worker_id, src, dst, split.ttft_s, split.itl_s, split.attainment)
