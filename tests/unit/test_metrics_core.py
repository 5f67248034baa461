"""kvrelay.cluster.metrics.recorder: what each recording call does to the exposed series."""

from __future__ import annotations

import math

import pytest

from kvrelay.cluster.metrics.defs import HIST_BUCKETS
from kvrelay.cluster.metrics.recorder import METRIC_NAMES, Metrics, SparseFigures, WorkerCounters

BLOCKS = {"gpu": {"free": 10, "used": 5, "cached": 1}, "cpu": {"free": 40}}


def val(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def finish(m: Metrics, **kw: object) -> None:
    args: dict[str, object] = dict(
        model="smol",
        outcome="finished_stop",
        ttft_s=0.3,
        itl_s_list=[0.02, 0.03, 0.5],
        e2e_s=1.5,
        queue_s=0.004,
        prompt_tokens=40,
        generation_tokens=4,
        cached_tokens=32,
    )
    args.update(kw)
    m.observe_request_finished(**args)  # type: ignore[arg-type]


def test_request_finished_records_every_figure() -> None:
    m = Metrics()
    finish(m)
    finish(m, outcome="finished_length", ttft_s=2.5, itl_s_list=[0.01], cached_tokens=0)
    assert val(m, "kvrelay_requests_total", model="smol", outcome="finished_stop") == 1
    assert val(m, "kvrelay_requests_total", model="smol", outcome="finished_length") == 1
    ttft = "kvrelay_time_to_first_token_seconds"
    assert val(m, f"{ttft}_count", model="smol") == 2
    assert val(m, f"{ttft}_sum", model="smol") == pytest.approx(2.8)
    assert val(m, f"{ttft}_bucket", model="smol", le="0.2") == 0
    assert val(m, f"{ttft}_bucket", model="smol", le="0.3") == 1  # le is inclusive
    assert val(m, f"{ttft}_bucket", model="smol", le="3.0") == 2
    itl = "kvrelay_inter_token_latency_seconds"
    assert val(m, f"{itl}_count", model="smol") == 4
    assert val(m, f"{itl}_bucket", model="smol", le="0.025") == 2
    assert val(m, f"{itl}_sum", model="smol") == pytest.approx(0.56)
    assert val(m, "kvrelay_prompt_tokens_total", model="smol") == 80
    assert val(m, "kvrelay_generation_tokens_total", model="smol") == 8
    assert val(m, "kvrelay_cached_prompt_tokens_total", model="smol") == 32
    assert val(m, "kvrelay_e2e_request_latency_seconds_count", model="smol") == 2
    assert val(m, "kvrelay_request_queue_time_seconds_bucket", model="smol", le="0.005") == 2


def test_rejected_request_has_no_latency_samples() -> None:
    m = Metrics()
    m.observe_request_finished("smol", "rejected", prompt_tokens=10)
    assert val(m, "kvrelay_requests_total", model="smol", outcome="rejected") == 1
    assert val(m, "kvrelay_time_to_first_token_seconds_count", model="smol") is None
    assert val(m, "kvrelay_prompt_tokens_total", model="smol") == 10


@pytest.mark.parametrize(
    "bad",
    [
        {"outcome": "finished"},
        {"ttft_s": -0.1},
        {"e2e_s": math.nan},
        {"queue_s": math.inf},
        {"itl_s_list": [0.1, math.nan]},
        {"itl_s_list": [0.1, -0.001]},
        {"prompt_tokens": -1},
        {"generation_tokens": 1.5},
        {"generation_tokens": True},
        {"cached_tokens": 41},  # more than the prompt
    ],
)
def test_bad_request_figures_raise_and_record_nothing(bad: dict[str, object]) -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        finish(m, **bad)
    assert b"kvrelay_requests_total{" not in m.render()
    assert b"kvrelay_prompt_tokens_total{" not in m.render()


def test_model_label_cardinality_is_bounded() -> None:
    fixed = Metrics(models=["smol"])
    finish(fixed, model="no-such-model")
    assert val(fixed, "kvrelay_requests_total", model="other", outcome="finished_stop") == 1
    assert (
        val(fixed, "kvrelay_requests_total", model="no-such-model", outcome="finished_stop") is None
    )
    capped = Metrics(max_models=2)
    for name in ("a", "b", "c", "d"):
        finish(capped, model=name)
    assert val(capped, "kvrelay_requests_total", model="b", outcome="finished_stop") == 1
    assert val(capped, "kvrelay_requests_total", model="other", outcome="finished_stop") == 2


def test_worker_heartbeats_set_gauges_and_accumulate_deltas() -> None:
    m = Metrics()
    d = WorkerCounters(
        kv_transfer_bytes=1000,
        kv_transfer_seconds=(0.002, 0.2),
        preemptions_swap=1,
        prefix_query_tokens=64,
        prefix_hit_tokens=48,
    )
    m.update_worker("p0", "prefill", True, BLOCKS, running=3, waiting=7, counters=d)
    m.update_worker(
        "p0",
        "prefill",
        False,
        {"gpu": {"free": 9, "used": 6}},
        running=2,
        waiting=0,
        counters=WorkerCounters(
            kv_transfer_bytes=24, preemptions_recompute=2, kv_received_bytes=512
        ),
    )
    w = {"worker": "p0", "role": "prefill"}
    assert val(m, "kvrelay_worker_healthy", **w) == 0
    assert val(m, "kvrelay_requests_running", **w) == 2
    assert val(m, "kvrelay_requests_waiting", **w) == 0
    assert val(m, "kvrelay_kv_blocks", **w, tier="gpu", state="used") == 6
    # a tier or state the heartbeat leaves out reads 0, not its old value
    assert val(m, "kvrelay_kv_blocks", **w, tier="gpu", state="cached") == 0
    assert val(m, "kvrelay_kv_blocks", **w, tier="cpu", state="free") == 0
    assert val(m, "kvrelay_kv_transfer_bytes_total", **w) == 1024
    assert val(m, "kvrelay_kv_received_bytes_total", **w) == 512
    assert val(m, "kvrelay_kv_transfer_duration_seconds_count", **w) == 2
    assert val(m, "kvrelay_kv_transfer_duration_seconds_bucket", **w, le="0.0025") == 1
    assert val(m, "kvrelay_preemptions_total", **w, kind="swap") == 1
    assert val(m, "kvrelay_preemptions_total", **w, kind="recompute") == 2
    assert val(m, "kvrelay_prefix_cache_queried_tokens_total", **w) == 64
    assert val(m, "kvrelay_prefix_cache_hit_tokens_total", **w) == 48


def test_role_change_moves_the_worker_series() -> None:
    m = Metrics()
    m.update_worker("w", "prefill", True, BLOCKS, 1, 0, WorkerCounters(kv_transfer_bytes=5))
    m.update_worker("w", "decode", True, BLOCKS, 4, 0)
    assert 'role="prefill"' not in m.render().decode()
    assert val(m, "kvrelay_requests_running", worker="w", role="decode") == 4
    assert m.workers() == {"w": "decode"}
    m.check_integrity()


def test_forget_worker_removes_all_its_series() -> None:
    m = Metrics()
    m.update_worker(
        "gone",
        "decode",
        True,
        BLOCKS,
        1,
        1,
        WorkerCounters(kv_transfer_seconds=(0.1,), preemptions_swap=1),
    )
    m.update_worker("stays", "decode", True, BLOCKS, 1, 1)
    assert m.forget_worker("gone") is True
    text = m.render().decode()
    assert 'worker="gone"' not in text
    assert 'worker="stays"' in text
    assert m.forget_worker("gone") is False
    assert m.workers() == {"stays": "decode"}
    m.check_integrity()
    # a series left behind is caught
    m.running.labels("ghost", "decode").set(1)
    with pytest.raises(AssertionError, match="ghost"):
        m.check_integrity()


def test_sparse_series_only_for_sparse_workers_and_forgotten_with_them() -> None:
    m = Metrics()
    m.update_worker("dense", "decode", True, BLOCKS, 1, 0)
    w = {"worker": "sparse", "role": "decode"}
    for selected, read in ((600, 0.5), (400, 0.25)):
        counters = WorkerCounters(sparse_selected_tokens=selected)
        m.update_worker("sparse", "decode", True, BLOCKS, 1, 0, counters, SparseFigures(read, 1.0))
    assert val(m, "kvrelay_sparse_decode_selected_tokens_total", **w) == 1000
    assert val(m, "kvrelay_sparse_decode_read_fraction", **w) == 0.25
    assert val(m, "kvrelay_sparse_prefill_density", **w) == 1.0
    dense = {"worker": "dense", "role": "decode"}
    assert val(m, "kvrelay_sparse_decode_read_fraction", **dense) is None
    m.forget_worker("sparse")
    assert 'worker="sparse"' not in m.render().decode()
    m.check_integrity()


def test_kernel_compiles_add_up_per_worker_and_leave_with_it() -> None:
    m = Metrics()
    w = {"worker": "g", "role": "colocated"}
    for n, s in ((5, 2.5), (0, 0.0), (1, 0.75)):
        m.update_worker(
            "g", "colocated", True, BLOCKS, 1, 0,
            WorkerCounters(kernel_compiles=n, kernel_compile_seconds=s),
        )  # fmt: skip
    assert val(m, "kvrelay_kernel_compiles_total", **w) == 6
    assert val(m, "kvrelay_kernel_compile_seconds_total", **w) == 3.25
    m.forget_worker("g")
    assert 'worker="g"' not in m.render().decode()
    m.check_integrity()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "router"}, "role"),
        ({"worker_id": ""}, "worker_id"),
        ({"kv_blocks": {"disk": {"free": 1}}}, "tier"),
        ({"kv_blocks": {"gpu": {"total": 1}}}, "state"),
        ({"kv_blocks": {"gpu": {"free": -1}}}, "free"),
        ({"running": -1}, "running"),
        ({"counters": WorkerCounters(prefix_query_tokens=1, prefix_hit_tokens=2)}, "prefix_hit"),
        ({"counters": WorkerCounters(kv_transfer_seconds=(math.nan,))}, "kv_transfer_seconds"),
        ({"counters": WorkerCounters(kernel_compiles=-1)}, "kernel_compiles"),
        ({"counters": WorkerCounters(kernel_compile_seconds=math.inf)}, "kernel_compile_seconds"),
        ({"sparse": SparseFigures(1.5, 1.0)}, "decode_read_fraction"),
        ({"sparse": SparseFigures(0.5, math.nan)}, "prefill_density"),
    ],
)
def test_bad_heartbeats_raise(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(
        worker_id="w", role="decode", healthy=True, kv_blocks=BLOCKS, running=0, waiting=0
    )
    args.update(kwargs)
    m = Metrics()
    with pytest.raises(ValueError, match=message):
        m.update_worker(**args)  # type: ignore[arg-type]
    assert m.workers() == {}


def test_migrations_by_outcome() -> None:
    m = Metrics()
    m.record_migration("migrated", 3)
    m.record_migration("recomputed")
    assert val(m, "kvrelay_migrations_total", outcome="migrated") == 3
    assert val(m, "kvrelay_migrations_total", outcome="recomputed") == 1
    with pytest.raises(ValueError):
        m.record_migration("lost")


def test_delivery_times_by_hop() -> None:
    m = Metrics()
    hops = ("worker_to_controller", "controller_loop_lag", "controller_to_frontend",
            "frontend_loop_lag")  # fmt: skip
    for hop in hops:
        # every hop reads 0 before its first time, not "no data"
        assert val(m, "kvrelay_event_delivery_seconds_count", hop=hop) == 0
    m.observe_delivery("frontend_loop_lag", [0.0004, 0.03, 0.2])
    m.observe_delivery("worker_to_controller", [])
    lag = {"hop": "frontend_loop_lag"}
    assert val(m, "kvrelay_event_delivery_seconds_count", **lag) == 3
    assert val(m, "kvrelay_event_delivery_seconds_bucket", **lag, le="0.0005") == 1
    assert val(m, "kvrelay_event_delivery_seconds_bucket", **lag, le="0.05") == 2
    assert val(m, "kvrelay_event_delivery_seconds_count", hop="worker_to_controller") == 0
    for hop, times in (("client", [0.1]), ("frontend_loop_lag", [0.1, -1.0]),
                       ("frontend_loop_lag", [float("nan")])):  # fmt: skip
        with pytest.raises(ValueError):
            m.observe_delivery(hop, times)
    assert val(m, "kvrelay_event_delivery_seconds_count", **lag) == 3  # nothing recorded


def test_instances_do_not_share_state() -> None:
    a, b = Metrics(), Metrics()
    finish(a)
    assert val(b, "kvrelay_requests_total", model="smol", outcome="finished_stop") is None


def test_metric_table_matches_the_registry() -> None:
    m = Metrics()
    exposed = {}
    for fam in m.registry.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        exposed[name] = (fam.type, labels)
    assert set(exposed) == set(METRIC_NAMES)
    for name, (mtype, _labels, doc) in METRIC_NAMES.items():
        assert exposed[name][0] == mtype and doc
        assert name.startswith("kvrelay_")
        if mtype == "histogram":
            assert name.endswith("_seconds") and list(HIST_BUCKETS[name]) == sorted(
                HIST_BUCKETS[name]
            )
        if mtype == "counter":
            assert name.endswith("_total")


def test_itl_buckets_are_dense_below_one_second() -> None:
    itl = HIST_BUCKETS["kvrelay_inter_token_latency_seconds"]
    assert sum(b < 1 for b in itl) >= 15 and itl[0] <= 0.001
    assert HIST_BUCKETS["kvrelay_time_to_first_token_seconds"][-1] >= 60
