"""Worker health and figures: ``HealthMonitor``, which the controller (controller.py) composes.

Every ``heartbeat_interval_s`` each worker gets one heartbeat call (at most one in flight per
worker, so a slow worker delays only its own figures). A heartbeat that fails or times out, or
reports a stopped engine loop, fails the worker; a good one feeds the KV directory its block
events, the router its prefill and transfer rates, the pool sizer its decode step times, and
/metrics the worker's figures (counters as deltas between heartbeats).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kvrelay.cluster.controller.admin import kv_blocks
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.state import ControllerState, WorkerEntry
from kvrelay.cluster.controller.worker_client import WorkerGone
from kvrelay.cluster.metrics.recorder import Metrics, SparseFigures, WorkerCounters
from kvrelay.cluster.routing.adapter import Routing
from kvrelay.cluster.sizing.autosize import PoolAutosizer
from kvrelay.workers.engine.kernel_compiles import COUNT_KEY, SECONDS_KEY
from kvrelay.workers.worker import Heartbeat

# EngineStats.extra key of a sparse-attention worker (workers/model/sparse_attention.py)
SELECTED = "sparse_decode_selected_tokens"


class HealthMonitor:
    def __init__(
        self,
        config: ControllerConfig,
        state: ControllerState,
        routing: Routing,
        metrics: Metrics,
        autosizer: PoolAutosizer | None,
        on_failure: Callable[[str, str], Awaitable[None]],  # (worker id, reason)
    ) -> None:
        self.config = config
        self.state = state
        self.routing = routing
        self.metrics = metrics
        self.autosizer = autosizer
        self.on_failure = on_failure

    async def run(self) -> None:
        beats: dict[str, asyncio.Task[None]] = {}
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            # one beat in flight per worker: a slow worker delays only its own figures
            for wid, entry in list(self.state.workers.items()):
                task = beats.get(wid)
                if task is None or task.done():
                    beats[wid] = asyncio.create_task(self._beat(entry))
            for wid in [w for w, t in beats.items() if t.done() and w not in self.state.workers]:
                del beats[wid]
            self.routing.directory.purge(50_000)  # reclaim dead workers' entries in slices

    async def _beat(self, entry: WorkerEntry) -> None:
        wid = entry.info.worker_id
        try:
            hb = await entry.client.call("heartbeat", timeout=self.config.heartbeat_timeout_s)
        except (WorkerGone, TimeoutError) as exc:
            await self.on_failure(wid, f"heartbeat: {exc!r}")
            return
        prev, entry.heartbeat = entry.heartbeat, hb
        if not hb.alive:
            await self.on_failure(wid, "engine loop stopped")
            return
        if entry.healthy and self.state.workers.get(wid) is entry:
            self.routing.directory.apply(wid, hb.kv_events)
            sent, secs = hb.transport.get("bytes_sent", 0.0), hb.transport.get("seconds_sending", 0.0)
            self.routing.observe(
                wid,
                prefill_tps=hb.prefill_tokens_per_s,
                transfer_bps=sent / secs if secs > 0 and sent > (1 << 20) else None,
            )
            self._record_heartbeat(entry, prev, hb)
            if self.autosizer is not None and entry.role in ("decode", "colocated"):
                self.autosizer.on_heartbeat(hb.stats.running, hb.decode_step_s)

    def _record_heartbeat(self, entry: WorkerEntry, prev: Heartbeat | None, hb: Heartbeat) -> None:
        """Worker figures reach /metrics with the heartbeat (counters as deltas)."""
        s, x = hb.stats, hb.stats.extra
        counters = heartbeat_counters(prev, hb)
        sparse = None
        if "sparse_decode_read_fraction" in x:  # the worker runs sparse attention
            sparse = SparseFigures(x["sparse_decode_read_fraction"], x["sparse_prefill_density"])
        self.metrics.update_worker(
            entry.info.worker_id, entry.role, entry.healthy, kv_blocks(s),
            s.running, s.waiting, counters, sparse,
        )


def heartbeat_counters(prev: Heartbeat | None, hb: Heartbeat) -> WorkerCounters:
    """What a worker did between two heartbeats: the differences of its running totals (never
    negative: a total that went back counts nothing)."""
    s, p = hb.stats, prev.stats if prev is not None else None
    t, pt = hb.transport, prev.transport if prev is not None else {}
    x, px = s.extra, p.extra if p is not None else {}

    def delta(now: float, before: float) -> int:
        return max(0, int(now - before))

    sent = delta(t.get("bytes_sent", 0), pt.get("bytes_sent", 0))
    received = delta(t.get("bytes_received", 0), pt.get("bytes_received", 0))
    transfers = delta(t.get("transfers_sent", 0), pt.get("transfers_sent", 0))
    seconds = max(0.0, t.get("seconds_sending", 0.0) - pt.get("seconds_sending", 0.0))
    return WorkerCounters(
        kv_transfer_bytes=sent,
        kv_received_bytes=received,
        kv_transfer_seconds=tuple([seconds / transfers] * transfers) if transfers else (),
        preemptions_swap=delta(s.swaps_out, p.swaps_out if p else 0),
        preemptions_recompute=delta(s.recompute_preemptions, p.recompute_preemptions if p else 0),
        prefix_query_tokens=delta(s.prefix_query_tokens, p.prefix_query_tokens if p else 0),
        prefix_hit_tokens=delta(s.prefix_hit_tokens, p.prefix_hit_tokens if p else 0),
        sparse_selected_tokens=delta(x.get(SELECTED, 0.0), px.get(SELECTED, 0.0)),
        kernel_compiles=delta(x.get(COUNT_KEY, 0.0), px.get(COUNT_KEY, 0.0)),
        kernel_compile_seconds=max(0.0, x.get(SECONDS_KEY, 0.0) - px.get(SECONDS_KEY, 0.0)),
    )
