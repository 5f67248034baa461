"""Metrics (issue 7) on a real cluster: a local 1P+1D Ray cluster on the default model (CPU), its
/metrics on the HTTP port (and on --metrics-port), sparse attention on (its figures included). A real Prometheus scrapes it under load and
answers PromQL (TTFT quantiles, token throughput, KV usage, and every dashboard query);
``promtool check metrics`` accepts the live exposition; every series the Grafana dashboard
queries is in it."""

from __future__ import annotations

import bisect
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from kvrelay.client import Client, InvalidArgumentError
from kvrelay.cluster.metrics.defs import HIST_BUCKETS
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster

PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (Debian package prometheus)",
)
WINDOW = "30s"  # stands for Grafana's $__rate_interval
SHARED = "You are a careful assistant. Answer in one short sentence. " * 3  # > 2 KV blocks


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import ray

    owns_ray = not ray.is_initialized()
    # sparse attention on (budget 64 decode tokens): the short prompts of the load still read
    # their whole context; test_sparse_attention_figures_reach_metrics's long one does not
    cfg = ServeConfig(grpc_port=0, http_port=0, metrics_port=0, threads_per_worker=1,
                      sparse_attention="both", sparse_budget=64)  # fmt: skip
    try:
        c = Cluster.start(cfg)
    except BaseException:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        raise
    try:
        yield c
    finally:
        c.shutdown()


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return bytes(r.read())


@dataclass
class Ledger:
    """What the load's clients saw, to hold Prometheus' answers against."""

    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_load(target: str, stop: threading.Event, ledger: Ledger, worker: int) -> None:
    """Greedy requests back to back until ``stop``; every other one shares a long prefix."""
    try:
        with Client(target, timeout=60) as c:
            i = 0
            while not stop.is_set():
                prompt = (SHARED if i % 2 else "") + f"Question {worker}-{i}: name a colour."
                res = c.generate(prompt, max_tokens=8, ignore_eos=True, temperature=0)
                with ledger.lock:
                    ledger.requests += 1
                    ledger.prompt_tokens += res.usage.prompt_tokens
                    ledger.generation_tokens += res.usage.completion_tokens
                    ledger.ttfts.append(res.timing.ttft_s)
                i += 1
    except BaseException as exc:  # surfaced by the test after join()
        ledger.errors.append(exc)


def bucket_bounds(buckets: tuple[float, ...], value: float) -> tuple[float, float]:
    """The (lower, upper] bucket holding ``value``."""
    i = bisect.bisect_left(buckets, value)
    return (buckets[i - 1] if i else 0.0), (buckets[i] if i < len(buckets) else math.inf)


def scalar(result: list[dict[str, Any]]) -> float:
    return float(result[0]["value"][1])


def finite(r: list[dict[str, Any]]) -> bool:
    return bool(r) and math.isfinite(scalar(r))


def positive(r: list[dict[str, Any]]) -> bool:
    return finite(r) and scalar(r) > 0


def check_under_load(prom: ModuleType, expo: ModuleType, url: str, cluster: Cluster) -> None:
    """The dashboard's own TTFT, throughput and KV usage queries answer while requests run, and
    so does every other dashboard query (Grafana's variables substituted)."""
    model = str(cluster.ports["model_id"])
    up = prom.wait_for(url, 'up{job="kvrelay"}', lambda r: bool(r) and scalar(r) == 1)
    assert len(up) == 1
    for q in (0.5, 0.9, 0.99):
        ttft = prom.wait_for(
            url,
            f"histogram_quantile({q}, sum by (le) (rate("
            f'kvrelay_time_to_first_token_seconds_bucket{{model=~"{model}"}}[{WINDOW}])))',
            positive,
            timeout_s=60,
        )
        assert scalar(ttft) < 60, ttft
    for kind in ("generation", "prompt"):
        prom.wait_for(url, f"sum(rate(kvrelay_{kind}_tokens_total[{WINDOW}]))", positive)
    usage = prom.wait_for(
        url,
        'sum by (tier) (kvrelay_kv_blocks{state="used"}) / sum by (tier) (kvrelay_kv_blocks)',
        lambda r: any(x["metric"]["tier"] == "gpu" and float(x["value"][1]) > 0 for x in r),
    )
    gpu_usage = next(float(x["value"][1]) for x in usage if x["metric"]["tier"] == "gpu")
    assert 0 < gpu_usage <= 1
    blocks = scalar(prom.query(url, 'sum(kvrelay_kv_blocks{tier="gpu"})'))
    assert blocks == sum(f["total"] for f in cluster.integrity().values())  # each block once
    prom.wait_for(url, "sum(kvrelay_prefix_cache_hit_tokens_total)", positive)
    prom.wait_for(url, f"sum(rate(kvrelay_kv_transfer_bytes_total[{WINDOW}]))", positive)
    for expr in expo.dashboard_exprs():
        if expr.startswith("label_values("):
            continue  # Grafana's templating function, not PromQL
        promql = (
            expr.replace("$__rate_interval", WINDOW)
            .replace("$model", model)
            .replace("$worker", ".*")
        )
        assert prom.query(url, promql), f"no data for dashboard query {promql!r}"


def check_totals(prom: ModuleType, url: str, ledger: Ledger) -> None:
    """After the load: Prometheus' totals equal what the clients saw, and the all-time TTFT
    median lies in the buckets the clients' TTFTs span."""
    assert not ledger.errors, ledger.errors
    assert ledger.requests >= 6
    for promql, want in (
        ("sum(kvrelay_generation_tokens_total)", ledger.generation_tokens),
        ("sum(kvrelay_prompt_tokens_total)", ledger.prompt_tokens),
        ('sum(kvrelay_requests_total{outcome="finished_length"})', ledger.requests),
        ("sum(kvrelay_time_to_first_token_seconds_count)", ledger.requests),
    ):
        prom.wait_for(url, promql, lambda r, w=want: bool(r) and scalar(r) == w)
    ttft_sum = scalar(prom.query(url, "sum(kvrelay_time_to_first_token_seconds_sum)"))
    assert ttft_sum == pytest.approx(math.fsum(ledger.ttfts), rel=1e-6)
    p50 = scalar(
        prom.query(
            url, "histogram_quantile(0.5, sum by (le) (kvrelay_time_to_first_token_seconds_bucket))"
        )
    )
    buckets = HIST_BUCKETS["kvrelay_time_to_first_token_seconds"]
    lo = bucket_bounds(buckets, min(ledger.ttfts))[0]
    hi = bucket_bounds(buckets, max(ledger.ttfts))[1]
    assert lo <= p50 <= hi, (p50, sorted(ledger.ttfts))


@needs_prometheus
def test_prometheus_scrapes_live_cluster_under_load(
    cluster: Cluster, load_test_file: Callable[[str], ModuleType]
) -> None:
    prom = load_test_file("tests/integration/test_prometheus_scrape.py")
    expo = load_test_file("tests/unit/test_metrics_exposition.py")
    url, stop_prometheus = prom.start_prometheus([f"127.0.0.1:{cluster.ports['http_port']}"])
    try:
        stop, ledger = threading.Event(), Ledger()
        target = f"127.0.0.1:{cluster.ports['grpc_port']}"
        threads = [
            threading.Thread(target=run_load, args=(target, stop, ledger, w), daemon=True)
            for w in range(3)
        ]
        for t in threads:
            t.start()
        try:
            check_under_load(prom, expo, url, cluster)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        check_totals(prom, url, ledger)
    finally:
        stop_prometheus()


def live_exposition(cluster: Cluster) -> bytes:
    """/metrics after traffic of three outcomes: finished, rejected and aborted."""
    with Client(f"127.0.0.1:{cluster.ports['grpc_port']}", timeout=60) as c:
        c.generate("Hello", max_tokens=4, temperature=0)
        with pytest.raises(InvalidArgumentError, match="top_p"):
            c.generate("Hello", top_p=0.0)
        stream = c.generate("Hello", max_tokens=200, ignore_eos=True, stream=True)
        next(stream)
        next(stream)
        stream.close()
    deadline = time.monotonic() + 20
    while True:  # the aborted stream is recorded when the server closes it, asynchronously
        body = scrape(int(cluster.ports["http_port"]))
        if b'outcome="aborted"' in body or time.monotonic() > deadline:
            return body
        threading.Event().wait(0.05)  # poll interval


@needs_prometheus
def test_promtool_accepts_live_metrics(cluster: Cluster) -> None:
    body = live_exposition(cluster)
    assert b'outcome="aborted"' in body and b'outcome="rejected"' in body
    for text in (body, scrape(int(cluster.ports["metrics_port"]))):
        proc = subprocess.run(
            [str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, timeout=30
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_dashboard_metric_is_in_live_metrics(
    cluster: Cluster, load_test_file: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit suite's dashboard check, fed the live exposition instead of a populated fixture
    (its parser and its assertions: names, label names, every metric has a panel)."""
    expo = load_test_file("tests/unit/test_metrics_exposition.py")
    body = live_exposition(cluster)

    class LiveText:
        def render(self) -> bytes:
            return body

    monkeypatch.setattr(expo, "populated", LiveText)  # a private copy of that module
    expo.test_dashboard_queries_only_exposed_series_and_labels()
    workers = cluster.workers()
    for name in ("kvrelay_worker_healthy", "kvrelay_requests_running", "kvrelay_kv_blocks"):
        found = set(re.findall(name + r'\{[^}]*role="(\w+)",[^}]*worker="([^"]+)"', body.decode()))
        assert found == {(role, w) for w, role in workers.items()}, name


def test_sparse_attention_figures_reach_metrics(cluster: Cluster) -> None:
    """The workers' sparse-attention figures (EngineStats.extra) reach /metrics with their
    heartbeats: a decode over a context longer than sink + budget + local pages reads less than
    dense would, and every prompt here being under min_prefill, both workers computed every causal
    prefill tile."""
    from prometheus_client.parser import text_string_to_metric_families

    port = int(cluster.ports["http_port"])
    with Client(f"127.0.0.1:{cluster.ports['grpc_port']}", timeout=60) as c:
        res = c.generate(SHARED * 12, max_tokens=8, ignore_eos=True, temperature=0)
    assert res.usage.prompt_tokens > 4 * 16 + 64 + 4 * 16  # past what a dense head reads whole

    def figures() -> dict[tuple[str, str], float]:
        text = scrape(port).decode()
        return {
            (s.name, s.labels["role"]): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name.startswith("kvrelay_sparse_")
        }

    deadline = time.monotonic() + 60
    got = figures()
    while got.get(("kvrelay_sparse_decode_read_fraction", "decode"), 1.0) >= 1.0:
        assert time.monotonic() < deadline, got  # heartbeats carry the figures
        threading.Event().wait(0.2)  # poll interval
        got = figures()
    assert 0 < got[("kvrelay_sparse_decode_read_fraction", "decode")] < 1
    assert got[("kvrelay_sparse_decode_selected_tokens_total", "decode")] > 0
    assert got[("kvrelay_sparse_prefill_density", "prefill")] == 1.0
    assert got[("kvrelay_sparse_prefill_density", "decode")] == 1.0
