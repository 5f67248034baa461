"""A token's time between the engine and the frontends, hop by hop, on a real local cluster
serving its HTTP frontend from this process: every worker's event sender (``outbox_wait``,
``sink_call``), the controller (``from_worker``, ``stream_wait``) and the driver
(``from_controller``, ``inbox_wait``) count what they handled, each call once, and a reset
starts them afresh (``Cluster.delivery_times``); /metrics counts the same calls
(``kvrelay_event_delivery_seconds``)."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster

pytestmark = pytest.mark.slow
STREAMS, TOKENS = 6, 12


def _stream(port: int, model: str, i: int) -> int:
    """One streamed completion over HTTP; the number of chunks that carried text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": model, "prompt": f"Count to {i}:", "max_tokens": TOKENS, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    chunks = 0
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data:") and line != "data: [DONE]":
            chunks += any(c.get("text") for c in json.loads(line[5:])["choices"])
    conn.close()
    return chunks


def _count(times: dict[str, dict[str, float]], phase: str) -> int:
    return int(times.get(phase, {}).get("count", 0))


def _sane(times: dict[str, Any]) -> None:
    for phase, figures in times.items():
        assert 0 <= figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"] < 60_000, phase


@pytest.mark.parametrize("semi_pd", [False, True], ids=["colocated", "semi_pd"])
def test_every_hop_counts_each_delivery_once(
    ray_session: None, tiny_model_dir: Path, wait: Callable[..., None], semi_pd: bool
) -> None:
    cfg = ServeConfig(model=str(tiny_model_dir), grpc_port=None, http_port=0,
                      threads_per_worker=1, colocated_workers=1, prefill_workers=0,
                      decode_workers=0, semi_pd=semi_pd)  # fmt: skip
    with Cluster.start(cfg) as cluster:
        port = int(cluster.ports["http_port"])
        cluster.delivery_times(reset=True)  # what the start-up sent (nothing) is forgotten
        with cf.ThreadPoolExecutor(STREAMS) as pool:
            model = cluster.ports["model_id"]
            chunks = list(pool.map(lambda i: _stream(port, model, i), range(STREAMS)))
        assert all(c >= 1 for c in chunks), chunks
        times = cluster.delivery_times(reset=True)
        (worker,) = times["workers"].values()
        controller, driver = times["controller"], times["driver"]
        for hop in (worker, controller, driver):
            _sane(hop)
        # each sink call is one delivery to the controller, each taken after it waited
        calls = _count(worker, "sink_call")
        assert calls >= 1 and _count(worker, "outbox_wait") == calls
        assert _count(controller, "from_worker") == calls
        # the controller's stream objects all reached the driver, which routed them on
        batches = cluster.frontends.event_batches() if cluster.frontends else 0
        assert _count(controller, "stream_wait") >= 1
        assert _count(driver, "from_controller") == batches >= 1
        # every request's inbox was read at least once per text chunk its client got (a
        # chunk is one take of the inbox; a take may carry several merged events)
        assert _count(driver, "inbox_wait") >= sum(chunks)
        # the frontends' loop measures its own lag as it runs (a 20 ms ticker)
        assert _count(driver, "loop_lag") >= 1
        # both loops measure their own lag as they run (20 ms tickers)
        assert _count(controller, "loop_lag") >= 1
        # read with reset: nothing since but the tickers'
        after = cluster.delivery_times()
        assert after["controller"].keys() <= {"loop_lag"} and after["driver"].keys() <= {"loop_lag"}
        assert all(w == {} for w in after["workers"].values())
        # the same hops on /metrics (kvrelay_event_delivery_seconds, never reset): the
        # controller's at once, the frontend's within its next report (about a second)
        assert _delivered(port, "worker_to_controller") == calls
        wait(lambda: _delivered(port, "controller_to_frontend") == batches)
        wait(lambda: _delivered(port, "frontend_loop_lag") >= 1)
        assert _delivered(port, "controller_loop_lag") >= 1


def _delivered(port: int, hop: str) -> int:
    """``kvrelay_event_delivery_seconds_count{hop=...}`` on the frontend's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    want = f'kvrelay_event_delivery_seconds_count{{hop="{hop}"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(want)]
    return int(float(line.split()[-1]))
