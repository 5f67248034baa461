"""What kvrelay's Prometheus metrics are: names, label values, histogram buckets, and the checks
the recording methods apply (``kvrelay.cluster.metrics.recorder`` records them). Pure data, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

# Label values: each set is closed, so every label has bounded cardinality.
REQUEST_OUTCOMES = ("finished_stop", "finished_length", "aborted", "error", "rejected")
MIGRATION_OUTCOMES = ("migrated", "recomputed", "finished_in_place", "failed")
PREEMPTION_KINDS = ("swap", "recompute")
KV_TIERS = ("gpu", "cpu")
KV_STATES = ("free", "used", "cached")
# a token's hops between an engine and its client that are timed (``observe_delivery``)
DELIVERY_HOPS = (
    "worker_to_controller",
    "controller_loop_lag",
    "controller_to_frontend",
    "frontend_loop_lag",
)

# Latency buckets (upper bounds, seconds). TTFT / e2e / queue span ms to minutes: a short prompt
# on a warm GPU answers in ~10 ms, a long prompt behind a queue in tens of seconds, a long
# generation in minutes. ITL is where SLOs live (20-100 ms per token), so its buckets are dense
# below 1 s; histogram_quantile interpolates linearly inside a bucket, and dense buckets keep
# that error small where it matters.
_TTFT = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
)
_ITL = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.125,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
_E2E = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
    600.0,
    1200.0,
)
_QUEUE = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
)
# A handoff moves a request's blocks: ~100 KB to a few GB, at 1-50 GB/s (NCCL) or far less on
# gloo/TCP, so ~100 µs to tens of seconds.
_TRANSFER = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

HIST_BUCKETS: dict[str, tuple[float, ...]] = {
    "kvrelay_time_to_first_token_seconds": _TTFT,
    "kvrelay_inter_token_latency_seconds": _ITL,
    "kvrelay_e2e_request_latency_seconds": _E2E,
    "kvrelay_request_queue_time_seconds": _QUEUE,
    "kvrelay_kv_transfer_duration_seconds": _TRANSFER,
    "kvrelay_event_delivery_seconds": _TRANSFER,
}

# Every metric family by its exposed name (counters with `_total`), with type, labels, meaning.
# README "Monitoring" is written from this table; a test checks it matches the registry.
METRIC_NAMES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "kvrelay_time_to_first_token_seconds": (
        "histogram",
        ("model",),
        "Time from request arrival to its first generated token.",
    ),
    "kvrelay_inter_token_latency_seconds": (
        "histogram",
        ("model",),
        "Gap between consecutive tokens of a streamed request.",
    ),
    "kvrelay_e2e_request_latency_seconds": (
        "histogram",
        ("model",),
        "Time from request arrival to its last token (or its end).",
    ),
    "kvrelay_request_queue_time_seconds": (
        "histogram",
        ("model",),
        "Time from arrival until a worker first scheduled the request.",
    ),
    "kvrelay_prompt_tokens_total": ("counter", ("model",), "Prompt tokens of ended requests."),
    "kvrelay_generation_tokens_total": (
        "counter",
        ("model",),
        "Tokens generated and streamed to clients.",
    ),
    "kvrelay_cached_prompt_tokens_total": (
        "counter",
        ("model",),
        "Prompt tokens served from KV cache instead of computed (cluster-wide hit rate = this / "
        "prompt tokens).",
    ),
    "kvrelay_requests_total": (
        "counter",
        ("model", "outcome"),
        "Requests ended, by outcome: finished_stop, finished_length, aborted, error, rejected.",
    ),
    "kvrelay_migrations_total": (
        "counter",
        ("outcome",),
        "In-flight requests handled on a preemption notice: migrated (KV moved), recomputed, "
        "finished_in_place, failed.",
    ),
    "kvrelay_request_resubmissions_total": (
        "counter",
        ("model",),
        "Requests resumed on a surviving worker (prompt + tokens already streamed) after the "
        "worker serving them failed or its node left.",
    ),
    "kvrelay_requests_running": (
        "gauge",
        ("worker", "role"),
        "Requests in the worker's running batch.",
    ),
    "kvrelay_requests_waiting": (
        "gauge",
        ("worker", "role"),
        "Requests queued on the worker, not yet running.",
    ),
    "kvrelay_worker_healthy": (
        "gauge",
        ("worker", "role"),
        "1 when the worker answers its health checks, else 0.",
    ),
    "kvrelay_kv_blocks": (
        "gauge",
        ("worker", "role", "tier", "state"),
        "KV blocks by tier (gpu, cpu) and state (free, used, cached).",
    ),
    "kvrelay_event_delivery_seconds": (
        "histogram",
        ("hop",),
        "A token's time on one hop from its engine to its client: worker_to_controller (a "
        "worker's event call, made to arrived), controller_loop_lag (how late the controller's "
        "event loop runs what is ready), controller_to_frontend (the controller's event stream, "
        "sent to read by a frontend process), frontend_loop_lag (the same lag in the frontends' "
        "loop: every stream there waits as long).",
    ),
    "kvrelay_kv_transfer_bytes_total": (
        "counter",
        ("worker", "role"),
        "KV bytes the worker sent to peers (handoffs, migrations, prefix pulls).",
    ),
    "kvrelay_kv_received_bytes_total": (
        "counter",
        ("worker", "role"),
        "KV bytes the worker received from peers; summed over workers it equals the bytes sent.",
    ),
    "kvrelay_kv_transfer_duration_seconds": (
        "histogram",
        ("worker", "role"),
        "Duration of each outgoing KV transfer, reserve to ack.",
    ),
    "kvrelay_preemptions_total": (
        "counter",
        ("worker", "role", "kind"),
        "Requests preempted inside a worker, by kind: swap (KV to CPU) or recompute.",
    ),
    "kvrelay_prefix_cache_queried_tokens_total": (
        "counter",
        ("worker", "role"),
        "Prompt tokens the worker looked up in its KV pools.",
    ),
    "kvrelay_prefix_cache_hit_tokens_total": (
        "counter",
        ("worker", "role"),
        "Looked-up prompt tokens found cached (GPU or CPU tier).",
    ),
    "kvrelay_kernel_compiles_total": (
        "counter",
        ("worker", "role"),
        "Triton kernels the worker's process compiled (or loaded from its disk cache) on first "
        "use of a specialization; after start-up each one stalled a serving step (logged).",
    ),
    "kvrelay_kernel_compile_seconds_total": (
        "counter",
        ("worker", "role"),
        "Seconds the worker's process spent in those compiles.",
    ),
    "kvrelay_sparse_decode_selected_tokens_total": (
        "counter",
        ("worker", "role"),
        "Sparse attention: KV tokens decode read, summed over sequences, KV heads and layers "
        "(workers with --sparse-attention decode or both).",
    ),
    "kvrelay_sparse_decode_read_fraction": (
        "gauge",
        ("worker", "role"),
        "Sparse attention: KV tokens decode read / what dense decode would have read, since the "
        "worker started.",
    ),
    "kvrelay_sparse_prefill_density": (
        "gauge",
        ("worker", "role"),
        "Sparse attention: (query, key) tiles prefill computed / causal tiles, since the worker "
        "started (1 until a prompt is long enough to prefill sparse).",
    ),
}


def check_sparse(f: SparseFigures) -> None:
    for what, x in (("decode_read_fraction", f.decode_read_fraction),
                    ("prefill_density", f.prefill_density)):  # fmt: skip
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1:
            raise ValueError(f"{what} must be a number in [0, 1], got {x!r}")


def check_choice(what: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, got {value!r}")


def check_count(what: str, value: int) -> None:
    # bool is an int subclass; a True token count is a caller bug, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")


def check_seconds(what: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class WorkerCounters:
    """What one worker did since its previous heartbeat (deltas, never running totals).

    ``kv_transfer_bytes`` counts what the worker sent (prefill in a handoff, the leaving worker
    in a migration), ``kv_received_bytes`` what it received, so the two sides of every link can
    be checked against each other; ``kv_transfer_seconds`` holds one duration per completed
    outgoing transfer, reserve to acknowledge.
    """

    kv_transfer_bytes: int = 0
    kv_transfer_seconds: tuple[float, ...] = ()
    preemptions_swap: int = 0
    preemptions_recompute: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in this worker's pools
    prefix_hit_tokens: int = 0  # of those, tokens found cached (GPU or CPU tier)
    kv_received_bytes: int = 0
    sparse_selected_tokens: int = 0  # KV tokens sparse decode read (sequences x heads x layers)
    kernel_compiles: int = 0  # Triton compiles in the worker's process (kernel_compiles.py)
    kernel_compile_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SparseFigures:
    """A sparse-attention worker's ratios since it started (``EngineStats.extra``), in [0, 1]."""

    decode_read_fraction: float
    prefill_density: float


def check_blocks(kv_blocks: Mapping[str, Mapping[str, int]]) -> dict[tuple[str, str], int]:
    out = {(t, s): 0 for t in KV_TIERS for s in KV_STATES}
    for tier, states in kv_blocks.items():
        check_choice("kv_blocks tier", tier, KV_TIERS)
        for state, n in states.items():
            check_choice("kv_blocks state", state, KV_STATES)
            check_count(f"kv_blocks[{tier}][{state}]", n)
            out[(tier, state)] = n
    return out


def check_counters(c: WorkerCounters) -> None:
    check_count("kv_transfer_bytes", c.kv_transfer_bytes)
    check_count("kv_received_bytes", c.kv_received_bytes)
    check_count("preemptions_swap", c.preemptions_swap)
    check_count("preemptions_recompute", c.preemptions_recompute)
    check_count("prefix_query_tokens", c.prefix_query_tokens)
    check_count("prefix_hit_tokens", c.prefix_hit_tokens)
    check_count("sparse_selected_tokens", c.sparse_selected_tokens)
    check_count("kernel_compiles", c.kernel_compiles)
    check_seconds("kernel_compile_seconds", c.kernel_compile_seconds)
    if c.prefix_hit_tokens > c.prefix_query_tokens:
        raise ValueError("prefix_hit_tokens > prefix_query_tokens")
    for s in c.kv_transfer_seconds:
        check_seconds("kv_transfer_seconds", s)
