"""A real Prometheus server (Debian's `prometheus`) scrapes kvrelay's /metrics and answers PromQL:
TTFT quantiles (histogram_quantile over rate), token throughput, KV usage by tier.

`start_prometheus(targets)` is the reusable part: point it at any `host:port` serving /metrics
(a live cluster's frontend included) and query the returned URL. Here the target is
`Metrics.render` behind an aiohttp server (`serve_handler`, as `kvrelay serve` mounts it) on a loopback port, and each scrape first
records a fixed batch of requests, so every scrape sees new increments and `rate()` has data
without the test pacing anything by time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from kvrelay.cluster.metrics.http_server import serve_handler
from kvrelay.cluster.metrics.recorder import CONTENT_TYPE, Metrics, WorkerCounters

PROMETHEUS = shutil.which("prometheus")
T = TypeVar("T")


# -- reusable: a throwaway Prometheus server -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def start_prometheus(
    targets: Sequence[str], scrape_interval: str = "500ms", ready_timeout_s: float = 30.0
) -> tuple[str, Callable[[], None]]:
    """Start `prometheus` scraping `targets` ("host:port", path /metrics) on a free loopback port.
    Returns (base URL, stop); stop() ends the process and removes its data dir, and is safe to
    call twice. Raises RuntimeError with the server's log if it does not become ready in time."""
    if PROMETHEUS is None:
        raise RuntimeError("prometheus binary not found")
    tmp = Path(tempfile.mkdtemp(prefix="kvrelay-prom-"))
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {
                "job_name": "kvrelay",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = (tmp / "log").open("wb")
    port = _free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)

    deadline = time.monotonic() + ready_timeout_s
    while True:
        if proc.poll() is not None:
            text = (tmp / "log").read_text(errors="replace")
            stop()
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{text}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return url, stop
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            text = (tmp / "log").read_text(errors="replace")
            stop()
            raise RuntimeError(f"prometheus not ready after {ready_timeout_s} s:\n{text}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)  # poll interval; returns early if the process dies


def query(url: str, promql: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": promql})
    body = _get_json(f"{url}/api/v1/query?{q}")
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def wait_for(
    url: str, promql: str, ok: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 20.0
) -> list[dict[str, Any]]:
    """Poll a query until ok(result) or the deadline; the last result is in the failure."""
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = query(url, promql)
        if ok(result):
            return result
        threading.Event().wait(0.1)  # poll interval between API calls
    pytest.fail(f"{promql!r} never satisfied the check; last result {result}")


# -- the scrape target ---------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop on its own thread, so the aiohttp server runs beside blocking test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


TTFT_S = 0.27  # inside the (0.2, 0.3] bucket
GEN_TOKENS = 20
BLOCKS = {"gpu": {"free": 60, "used": 30, "cached": 10}, "cpu": {"free": 100}}


def record_batch(m: Metrics) -> None:
    for _ in range(10):
        m.observe_request_finished(
            "smol",
            "finished_stop",
            ttft_s=TTFT_S,
            itl_s_list=[0.03] * 19,
            e2e_s=0.9,
            queue_s=0.01,
            prompt_tokens=64,
            generation_tokens=GEN_TOKENS,
            cached_tokens=32,
        )
    for w in ("p0", "d0"):
        m.update_worker(
            w,
            "prefill" if w == "p0" else "decode",
            True,
            BLOCKS,
            running=3,
            waiting=1,
            counters=WorkerCounters(kv_transfer_bytes=1 << 20, kv_transfer_seconds=(0.004,)),
        )


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)"
)
def test_prometheus_scrapes_and_answers_promql(loop_thread: LoopThread) -> None:
    m = Metrics()
    scrapes = threading.Semaphore(0)

    async def scrape(request: web.Request) -> web.StreamResponse:
        record_batch(m)  # new increments before every scrape
        scrapes.release()
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})

    server = loop_thread.run(serve_handler(scrape, 0))
    url, stop = start_prometheus([f"127.0.0.1:{server.port}"])
    try:
        for _ in range(4):  # enough samples for rate() over a 10 s window
            assert scrapes.acquire(timeout=20), "prometheus did not scrape"
        targets = _get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets

        p50, p99 = (
            f"histogram_quantile({q}, sum by (le) "
            f"(rate(kvrelay_time_to_first_token_seconds_bucket[10s])))"
            for q in (0.5, 0.99)
        )
        finite = lambda r: bool(r) and math.isfinite(float(r[0]["value"][1]))  # noqa: E731
        for promql in (p50, p99):
            value = float(wait_for(url, promql, finite)[0]["value"][1])
            assert 0.2 < value <= 0.3, (promql, value)  # the bucket holding every TTFT

        throughput = "sum(rate(kvrelay_generation_tokens_total[10s]))"
        assert float(wait_for(url, throughput, finite)[0]["value"][1]) > 0
        per_request = (
            "sum(rate(kvrelay_generation_tokens_total[10s])) / "
            'sum(rate(kvrelay_requests_total{outcome="finished_stop"}[10s]))'
        )
        assert float(wait_for(url, per_request, finite)[0]["value"][1]) == pytest.approx(GEN_TOKENS)

        usage = (
            'sum by (tier) (kvrelay_kv_blocks{state="used"}) / sum by (tier) (kvrelay_kv_blocks)'
        )
        result = wait_for(url, usage, lambda r: len(r) == 2)
        by_tier = {r["metric"]["tier"]: float(r["value"][1]) for r in result}
        assert by_tier == {"gpu": pytest.approx(0.3), "cpu": 0.0}

        transfer = "sum(rate(kvrelay_kv_transfer_bytes_total[10s]))"
        assert float(wait_for(url, transfer, finite)[0]["value"][1]) > 0
    finally:
        stop()
        loop_thread.run(server.close())


def test_serve_metrics_standalone(loop_thread: LoopThread) -> None:
    m = Metrics()
    m.record_migration("migrated")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})

    async def fetch() -> tuple[int, str, str]:
        server = await serve_handler(handler, 0)
        try:
            async with aiohttp.ClientSession() as s, s.get(server.url) as r:
                return r.status, r.headers["Content-Type"], await r.text()
        finally:
            await server.close()

    status, ctype, body = loop_thread.run(fetch())
    assert status == 200
    assert ctype == CONTENT_TYPE
    assert 'kvrelay_migrations_total{outcome="migrated"} 1.0' in body
    with pytest.raises(ValueError):
        loop_thread.run(serve_handler(handler, 70000))
