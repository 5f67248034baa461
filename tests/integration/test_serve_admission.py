"""Truthful answers from a real 1P+1D cluster (default model, CPU) for states that are not
server bugs, and a cluster that heals: a prompt longer than any KV pool (400 naming both
numbers), a lone surrogate (400), every worker drained (bounded wait, then 503 + Retry-After;
``kvrelay undrain`` brings it back), 1 ms gRPC deadlines (no block leaked: every pool's
``check_integrity`` clean), ``kill -9`` of a worker (a replacement registers and serves),
and HTTP clients that never finish their request (closed on time)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from kvrelay.client import Client
from kvrelay.cluster.runtime.serve import Cluster, ServeConfig
from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb
from kvrelay_testing.serve_process import complete, http, kvrelay_argv

KV_GB = 0.05  # a pool of about a thousand tokens: far below the model's 8,192-token context
WAIT_S = 1.5  # admission wait: how long a request waits for a worker before 503
HEAD_S, BODY_S = 2.0, 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cfg = ServeConfig(
        grpc_port=0, http_port=0, threads_per_worker=1, kv_cache_gb=KV_GB,
        admission_wait_s=WAIT_S, http_header_timeout_s=HEAD_S, http_body_timeout_s=BODY_S,
    )
    c = Cluster.start(cfg)
    try:
        yield c
    finally:
        c.shutdown()


def _port(c: Cluster) -> int:
    return int(c.ports["http_port"])


def _idle(c: Cluster, timeout_s: float = 30.0) -> dict[str, dict[str, int]]:
    """Poll until no request is in flight and no block is used anywhere; the pools' own
    ``check_integrity`` runs inside every ``integrity()`` call (it raises on a broken pool)."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = c.integrity()
        quiet = c.counters()["in_flight"] == 0 and all(
            f["used"] == 0 and f["requests"] == 0 and f["reservations"] == 0
            for f in figures.values()
        )
        if quiet or time.monotonic() > deadline:
            return figures
        time.sleep(0.1)


def test_prompt_longer_than_every_pool_is_400_naming_both_numbers(cluster: Cluster) -> None:
    ctx = 8192
    too_long = [42] * 3000  # < the model's context, > the pool (0.05 GB)
    r = complete(_port(cluster), too_long, max_tokens=1)
    assert r.status == 400, r
    msg = r.json()["error"]["message"]
    m = re.search(r"prompt of (\d+) tokens .* \((\d+) tokens\)", msg)
    assert m, msg
    assert int(m.group(1)) == 3000 and int(m.group(2)) < 3000 < ctx
    limit = int(m.group(2))
    # the boundary: the longest prompt the pool holds is served, one more token is refused
    assert complete(_port(cluster), [42] * limit, max_tokens=1).status == 200
    assert complete(_port(cluster), [42] * (limit + 1), max_tokens=1).status == 400
    with grpc.insecure_channel(f"127.0.0.1:{cluster.ports['grpc_port']}") as ch:
        call = ch.unary_stream("/kvrelay.v1.Generation/Generate")
        req = gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=[42] * (limit + 1)))
        with pytest.raises(grpc.RpcError) as err:
            list(call(req.SerializeToString(), timeout=60))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert str(limit) in (err.value.details() or "")


def test_lone_surrogate_in_a_prompt_is_400(cluster: Cluster) -> None:
    body = b'{"model": "", "prompt": "abc \\ud800 def", "max_tokens": 2}'
    with socket.create_connection(("127.0.0.1", _port(cluster)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert b"surrogate" in reply


def test_one_ms_deadlines_leak_no_block(cluster: Cluster) -> None:
    prompt = [7, 8, 9, 10] * 40
    with grpc.insecure_channel(f"127.0.0.1:{cluster.ports['grpc_port']}") as ch:
        call = ch.unary_stream("/kvrelay.v1.Generation/Generate")
        for i in range(100):
            req = gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=[i, *prompt]),
                                      sampling=gpb.SamplingParams(max_tokens=8))
            with pytest.raises(grpc.RpcError) as err:
                list(call(req.SerializeToString(), timeout=0.001))
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    figures = _idle(cluster)
    assert figures and all(
        f["used"] == 0 and f["requests"] == 0 and f["reservations"] == 0
        for f in figures.values()
    ), figures


def test_all_drained_waits_then_503_and_undrain_brings_it_back(cluster: Cluster) -> None:
    target = f"127.0.0.1:{cluster.ports['grpc_port']}"
    workers = cluster.workers()
    with Client(target) as client:
        for wid in workers:
            assert client.drain(wid)
    t0 = time.monotonic()
    r = complete(_port(cluster), "Hello there", max_tokens=2)
    waited = time.monotonic() - t0
    assert r.status == 503, r
    assert r.headers.get("Retry-After", "").isdigit(), r.headers
    assert WAIT_S * 0.8 <= waited < WAIT_S + 10, waited
    assert http(_port(cluster), "/ready").status == 503
    assert http(_port(cluster), "/health").status == 200  # alive, just not ready
    for wid in workers:  # the CLI, as an operator runs it
        out = subprocess.run([*kvrelay_argv(), "undrain", wid, "--target", target],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    assert http(_port(cluster), "/ready").status == 200
    assert complete(_port(cluster), "Hello there", max_tokens=2).status == 200
    with Client(target) as client:
        assert not any(w.draining for w in client.cluster_status().workers)
        assert not client.undrain("no-such-worker")


def test_a_killed_worker_is_replaced_and_serves(cluster: Cluster) -> None:
    before = cluster.workers()
    victim = next(w for w, role in before.items() if role == "decode")
    os.kill(int(cluster.call("worker_pid", victim)), signal.SIGKILL)
    t0 = time.monotonic()
    deadline = t0 + 30
    while True:
        now = cluster.workers()
        fresh = [w for w, role in now.items() if role == "decode" and w not in before]
        if fresh and victim not in now:
            break
        assert time.monotonic() < deadline, f"pool not back to size in 30 s: {now}"
        time.sleep(0.2)
    assert sorted(now.values()) == ["decode", "prefill"]
    # a fresh prompt of several full blocks (cached where it was decoded): prefill on P,
    # handoff, decode on the new D
    handoffs = cluster.counters()["handoffs"]
    prompt = " ".join(f"replacement{i}" for i in range(40))
    r = complete(_port(cluster), prompt, max_tokens=6)
    assert r.status == 200, r
    assert cluster.counters()["handoffs"] == handoffs + 1
    used = _stored_blocks(cluster, fresh[0])
    assert used > 0, "the replacement decode worker never held the request's blocks"


def _stored_blocks(c: Cluster, worker_id: str) -> int:
    figures = c.integrity()[worker_id]
    return int(figures.get("used", 0)) + int(figures.get("cached", 0))


def test_half_sent_body_and_slow_headers_are_closed_on_time(cluster: Cluster) -> None:
    port = _port(cluster)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        t0 = time.monotonic()
        reply = _read_all(s)
        took = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_S * 0.8 <= took < BODY_S + 5, took
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        t0 = time.monotonic()
        reply = _read_all(s)
        took = time.monotonic() - t0
    assert reply == b"" and HEAD_S * 0.8 <= took < HEAD_S + 5, (reply, took)
    assert http(port, "/health").status == 200  # and the server still answers others


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)

