"""A worker's running totals turned into the deltas /metrics adds up (cluster/controller/health.py,
``heartbeat_counters``): KV bytes and transfers, preemptions, prefix-cache tokens, and the figures
a worker keeps in ``EngineStats.extra`` (sparse tokens read, kernel compiles and their seconds)."""

from __future__ import annotations

from kvrelay.cluster.controller.health import heartbeat_counters
from kvrelay.workers.engine.config import EngineStats
from kvrelay.workers.types import PoolStats
from kvrelay.workers.worker import Heartbeat


def beat(
    extra: dict[str, float], transport: dict[str, float], swaps: int = 0, queried: int = 0
) -> Heartbeat:
    stats = EngineStats(
        PoolStats(64, 60, 4, 0), running=1, waiting=0, handoff=0, prompt_tokens_computed=0,
        decode_tokens_computed=0, preemptions=swaps, prefix_query_tokens=queried,
        prefix_hit_tokens=queried // 2, steps=1, extra=extra, swaps_out=swaps,
    )  # fmt: skip
    return Heartbeat("w", "decode", stats, (), transport, True)


def test_the_first_heartbeat_counts_its_totals_and_later_ones_their_growth() -> None:
    first = beat(
        {"kernel_compiles": 40.0, "kernel_compile_seconds": 12.5},
        {"bytes_sent": 1000.0, "transfers_sent": 2.0, "seconds_sending": 0.5},
        swaps=1, queried=64,
    )  # fmt: skip
    c = heartbeat_counters(None, first)
    assert (c.kernel_compiles, c.kernel_compile_seconds) == (40, 12.5)
    assert (c.kv_transfer_bytes, c.kv_transfer_seconds) == (1000, (0.25, 0.25))
    assert (c.preemptions_swap, c.prefix_query_tokens, c.prefix_hit_tokens) == (1, 64, 32)
    second = beat(
        {"kernel_compiles": 42.0, "kernel_compile_seconds": 13.25, "sparse_decode_selected_tokens": 9.0},
        {"bytes_sent": 1500.0, "transfers_sent": 3.0, "seconds_sending": 0.75},
        swaps=1, queried=96,
    )  # fmt: skip
    c = heartbeat_counters(first, second)
    assert (c.kernel_compiles, c.kernel_compile_seconds) == (2, 0.75)
    assert c.sparse_selected_tokens == 9
    assert (c.kv_transfer_bytes, c.kv_transfer_seconds) == (500, (0.25,))
    assert (c.preemptions_swap, c.prefix_query_tokens, c.prefix_hit_tokens) == (0, 32, 16)


def test_a_worker_without_the_figures_or_with_totals_gone_back_counts_nothing() -> None:
    none = heartbeat_counters(None, beat({}, {}))
    assert (none.kernel_compiles, none.kernel_compile_seconds, none.kv_transfer_bytes) == (
        0,
        0.0,
        0,
    )
    before = beat({"kernel_compiles": 5.0, "kernel_compile_seconds": 2.0}, {"bytes_sent": 10.0})
    after = beat({"kernel_compiles": 1.0, "kernel_compile_seconds": 0.5}, {"bytes_sent": 4.0})
    c = heartbeat_counters(before, after)
    assert (c.kernel_compiles, c.kernel_compile_seconds, c.kv_transfer_bytes) == (0, 0.0, 0)
