"""Prometheus metrics of one frontend (one scrape target): request latencies and tokens measured
where the stream passes, worker figures (KV blocks, queues, transfers, preemptions) fed from the
heartbeats, migrations from the planner's executor.

Every metric lives in the ``Metrics`` object's own ``CollectorRegistry`` (no process-global
state: two clusters in one test process do not mix). Names follow Prometheus' rules: prefix
``kvrelay_``, base units in the name (``_seconds``, ``_bytes``, ``_tokens``), ``_total`` on
counters. Labels are bounded: ``worker`` (cluster size; ``forget_worker`` removes a gone one),
``role``, ``model`` (the served set, see ``Metrics(models=...)``), ``tier``, ``state``,
``outcome``, ``kind`` — never a request id.

Heartbeat figures come as gauges (current values) and ``WorkerCounters`` (what happened since
the previous heartbeat: deltas, so a worker restart needs no bookkeeping here). The metric list
with meanings is in README "Monitoring"; ``METRIC_NAMES`` is the machine-readable list.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvrelay.cluster.metrics.defs import (
    DELIVERY_HOPS,
    HIST_BUCKETS,
    KV_STATES,
    KV_TIERS,
    METRIC_NAMES,
    MIGRATION_OUTCOMES,
    PREEMPTION_KINDS,
    REQUEST_OUTCOMES,
    SparseFigures,
    WorkerCounters,
    check_blocks,
    check_choice,
    check_count,
    check_counters,
    check_seconds,
    check_sparse,
)
from kvrelay.workers.types import ROLES

__all__ = ["CONTENT_TYPE", "METRIC_NAMES", "Metrics", "SparseFigures", "WorkerCounters"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER_MODEL = "other"  # label for model names outside the served set (bounded cardinality)


class Metrics:
    """One frontend's metrics. Thread-safe (prometheus_client metrics lock themselves; the worker
    table has its own lock). Cost, measured on this CPU: a finished request ~20 µs plus ~1.5 µs
    per inter-token gap (256 tokens: ~0.4 ms); a heartbeat ~65 µs."""

    def __init__(self, models: Iterable[str] | None = None, max_models: int = 32) -> None:
        # models=None: the first `max_models` names seen get a label each, later ones "other";
        # models given: exactly those, anything else "other" (a rejected request's bogus model
        # name must not mint a series).
        self._fixed_models = models is not None
        self._models: set[str] = set(models or ())
        self._max_models = max_models
        self._lock = threading.Lock()
        self._worker_roles: dict[str, str] = {}  # worker -> role its series carry
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # names, types, labels and help text come from METRIC_NAMES (defs.py)
        # -- requests (measured at the frontend) --
        self.ttft = _histogram(r, "kvrelay_time_to_first_token_seconds")
        self.itl = _histogram(r, "kvrelay_inter_token_latency_seconds")
        self.e2e = _histogram(r, "kvrelay_e2e_request_latency_seconds")
        self.queue = _histogram(r, "kvrelay_request_queue_time_seconds")
        self.prompt_tokens = _counter(r, "kvrelay_prompt_tokens_total")
        self.generation_tokens = _counter(r, "kvrelay_generation_tokens_total")
        self.cached_prompt_tokens = _counter(r, "kvrelay_cached_prompt_tokens_total")
        self.requests = _counter(r, "kvrelay_requests_total")
        self.migrations = _counter(r, "kvrelay_migrations_total")
        self.resubmissions = _counter(r, "kvrelay_request_resubmissions_total")
        self.delivery = _histogram(r, "kvrelay_event_delivery_seconds")
        for hop in DELIVERY_HOPS:
            self.delivery.labels(hop)
        for model in self._models:  # the served models read 0 until a worker fails
            self.resubmissions.labels(model)
        for outcome in MIGRATION_OUTCOMES:  # a closed set known up front: a cluster that never
            self.migrations.labels(outcome)  # migrated reads 0 rather than "no data"
        # -- workers (from heartbeats) --
        self.running = _gauge(r, "kvrelay_requests_running")
        self.waiting = _gauge(r, "kvrelay_requests_waiting")
        self.healthy = _gauge(r, "kvrelay_worker_healthy")
        self.kv_blocks = _gauge(r, "kvrelay_kv_blocks")
        self.transfer_bytes = _counter(r, "kvrelay_kv_transfer_bytes_total")
        self.received_bytes = _counter(r, "kvrelay_kv_received_bytes_total")
        self.transfer_seconds = _histogram(r, "kvrelay_kv_transfer_duration_seconds")
        self.preemptions = _counter(r, "kvrelay_preemptions_total")
        self.prefix_queries = _counter(r, "kvrelay_prefix_cache_queried_tokens_total")
        self.prefix_hits = _counter(r, "kvrelay_prefix_cache_hit_tokens_total")
        self.compiles = _counter(r, "kvrelay_kernel_compiles_total")
        self.compile_seconds = _counter(r, "kvrelay_kernel_compile_seconds_total")
        # -- sparse attention (workers that run it only) --
        self.sparse_selected = _counter(r, "kvrelay_sparse_decode_selected_tokens_total")
        self.sparse_read = _gauge(r, "kvrelay_sparse_decode_read_fraction")
        self.sparse_density = _gauge(r, "kvrelay_sparse_prefill_density")

    # -- request path -----------------------------------------------------------------------------

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        with self._lock:
            if not self._fixed_models and len(self._models) < self._max_models:
                self._models.add(model)
                return model
        return OTHER_MODEL

    def observe_request_finished(
        self,
        model: str,
        outcome: str,
        ttft_s: float | None = None,
        itl_s_list: Sequence[float] = (),
        e2e_s: float | None = None,
        queue_s: float | None = None,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> None:
        """Record one ended request. Times the request never reached stay ``None`` (a rejected
        request has no TTFT); ``itl_s_list`` holds the gaps between consecutive streamed tokens.
        Raises ValueError (and records nothing) on an unknown outcome or a negative/NaN figure."""
        check_choice("outcome", outcome, REQUEST_OUTCOMES)
        for name, v in (("ttft_s", ttft_s), ("e2e_s", e2e_s), ("queue_s", queue_s)):
            if v is not None:
                check_seconds(name, v)
        if itl_s_list:
            total = math.fsum(itl_s_list)  # C loops: NaN/inf poison the sum, min finds negatives
            if not math.isfinite(total) or min(itl_s_list) < 0:
                raise ValueError("itl_s_list: every gap must be a finite number >= 0")
        check_count("prompt_tokens", prompt_tokens)
        check_count("generation_tokens", generation_tokens)
        check_count("cached_tokens", cached_tokens)
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) > prompt_tokens ({prompt_tokens})")
        m = self.model_label(model)
        self.requests.labels(m, outcome).inc()
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
        if e2e_s is not None:
            self.e2e.labels(m).observe(e2e_s)
        if queue_s is not None:
            self.queue.labels(m).observe(queue_s)
        if itl_s_list:
            child = self.itl.labels(m)
            for gap in itl_s_list:
                child.observe(gap)
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generation_tokens)
        self.cached_prompt_tokens.labels(m).inc(cached_tokens)

    def observe_delivery(self, hop: str, seconds: Sequence[float]) -> None:
        """Record the times ``seconds`` of one hop (``DELIVERY_HOPS``) that events took
        between their engine and their client. Raises ValueError (records nothing) on an unknown
        hop or a negative / NaN time."""
        check_choice("hop", hop, DELIVERY_HOPS)
        if seconds:
            total = math.fsum(seconds)
            if not math.isfinite(total) or min(seconds) < 0:
                raise ValueError("seconds: every time must be a finite number >= 0")
        child = self.delivery.labels(hop)
        for s in seconds:
            child.observe(s)

    def record_migration(self, outcome: str, count: int = 1) -> None:
        check_choice("outcome", outcome, MIGRATION_OUTCOMES)
        check_count("count", count)
        self.migrations.labels(outcome).inc(count)

    def record_resubmission(self, model: str) -> None:
        """A request resumed on another worker after its worker failed."""
        self.resubmissions.labels(self.model_label(model)).inc()

    # -- heartbeat path ---------------------------------------------------------------------------

    def update_worker(
        self,
        worker_id: str,
        role: str,
        healthy: bool,
        kv_blocks: Mapping[str, Mapping[str, int]],
        running: int,
        waiting: int,
        counters: WorkerCounters | None = None,
        sparse: SparseFigures | None = None,
    ) -> None:
        """Apply one heartbeat. ``kv_blocks`` is tier -> state -> blocks (tiers: gpu, cpu;
        states: free, used, cached); a tier or state left out reads 0. ``sparse``: the worker
        runs sparse attention (its sparse series exist only then). A worker whose role changed
        (prefill turned decode) loses its old-role series: counters restart under the new role,
        which ``rate()`` treats as a reset."""
        if not worker_id:
            raise ValueError("worker_id must be a non-empty string")
        check_choice("role", role, ROLES)
        check_count("running", running)
        check_count("waiting", waiting)
        blocks = check_blocks(kv_blocks)
        c = counters or WorkerCounters()
        check_counters(c)
        if sparse is not None:
            check_sparse(sparse)
        with self._lock:
            old = self._worker_roles.get(worker_id)
            if old is not None and old != role:
                self._remove_series(worker_id, old)
            self._worker_roles[worker_id] = role
            w = (worker_id, role)
            self.healthy.labels(*w).set(1 if healthy else 0)
            self.running.labels(*w).set(running)
            self.waiting.labels(*w).set(waiting)
            for (tier, state), n in blocks.items():
                self.kv_blocks.labels(*w, tier, state).set(n)
            # .inc(0) still creates the series, so a quiet worker shows 0 rather than no data
            self.transfer_bytes.labels(*w).inc(c.kv_transfer_bytes)
            self.received_bytes.labels(*w).inc(c.kv_received_bytes)
            tchild = self.transfer_seconds.labels(*w)
            for s in c.kv_transfer_seconds:
                tchild.observe(s)
            self.preemptions.labels(*w, "swap").inc(c.preemptions_swap)
            self.preemptions.labels(*w, "recompute").inc(c.preemptions_recompute)
            self.prefix_queries.labels(*w).inc(c.prefix_query_tokens)
            self.prefix_hits.labels(*w).inc(c.prefix_hit_tokens)
            self.compiles.labels(*w).inc(c.kernel_compiles)
            self.compile_seconds.labels(*w).inc(c.kernel_compile_seconds)
            if sparse is not None:
                self.sparse_selected.labels(*w).inc(c.sparse_selected_tokens)
                self.sparse_read.labels(*w).set(sparse.decode_read_fraction)
                self.sparse_density.labels(*w).set(sparse.prefill_density)

    def forget_worker(self, worker_id: str) -> bool:
        """Drop every series of a worker that left; True if it was known."""
        with self._lock:
            role = self._worker_roles.pop(worker_id, None)
            if role is not None:
                self._remove_series(worker_id, role)
            return role is not None

    def workers(self) -> dict[str, str]:
        with self._lock:
            return dict(self._worker_roles)

    def check_integrity(self) -> None:
        """Every per-worker series belongs to a known worker under its current role, and every
        known worker has its health series (so forget_worker and role changes leave no stale
        series behind). Raises AssertionError otherwise."""
        with self._lock:
            known = set(self._worker_roles.items())
            seen: set[tuple[str, str]] = set()
            for family in self.registry.collect():
                for sample in family.samples:
                    if "worker" in sample.labels:
                        seen.add((sample.labels["worker"], sample.labels["role"]))
            assert seen <= known, f"series of unknown workers: {sorted(seen - known)}"
            (family,) = self.healthy.collect()
            healthy = {(s.labels["worker"], s.labels["role"]) for s in family.samples}
            assert healthy == known, f"workers without health series: {sorted(known - healthy)}"

    def _remove_series(self, worker_id: str, role: str) -> None:
        w = (worker_id, role)
        for g in (
            self.healthy,
            self.running,
            self.waiting,
            self.transfer_bytes,
            self.received_bytes,
            self.transfer_seconds,
            self.prefix_queries,
            self.prefix_hits,
            self.compiles,
            self.compile_seconds,
            self.sparse_selected,
            self.sparse_read,
            self.sparse_density,
        ):
            g.remove(*w)  # absent label sets are ignored by prometheus_client
        for tier in KV_TIERS:
            for state in KV_STATES:
                self.kv_blocks.remove(*w, tier, state)
        for kind in PREEMPTION_KINDS:
            self.preemptions.remove(*w, kind)

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``) of every series."""
        return generate_latest(self.registry)


def _spec(name: str, kind: str) -> tuple[str, list[str], str]:
    mtype, labels, doc = METRIC_NAMES[name]
    assert mtype == kind, f"{name} is a {mtype}"
    # prometheus_client appends `_total` to counter names itself
    return name.removesuffix("_total") if kind == "counter" else name, list(labels), doc


def _histogram(r: CollectorRegistry, name: str) -> Histogram:
    n, labels, doc = _spec(name, "histogram")
    return Histogram(n, doc, labels, buckets=HIST_BUCKETS[name], registry=r)


def _counter(r: CollectorRegistry, name: str) -> Counter:
    n, labels, doc = _spec(name, "counter")
    return Counter(n, doc, labels, registry=r)


def _gauge(r: CollectorRegistry, name: str) -> Gauge:
    n, labels, doc = _spec(name, "gauge")
    return Gauge(n, doc, labels, registry=r)
