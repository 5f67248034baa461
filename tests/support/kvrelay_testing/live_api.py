"""A live cluster's handle and the calls the API tests make on it (tests/integration/
test_api_cluster.py): the keys it accepts, clients of both APIs that trust its self-signed
certificate, raw gRPC / HTTPS calls, and leak checks read from the workers' own pools
(``Cluster.integrity()``) and the controller's request table."""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai

from kvrelay.client import Client
from kvrelay.cluster.runtime.serve import Cluster

USER_KEY, ADMIN_KEY = "sk-user-live-3b9f", "sk-admin-live-c07a"


@dataclass(frozen=True)
class Live:
    """The running cluster, and what the fuzz oracle reads (model, vocab, ctx, tok)."""

    cluster: Cluster
    workers: dict[str, str]  # worker id -> role, at start
    grpc_target: str
    http_port: int
    cert: Path  # the self-signed certificate both frontends serve
    model: str
    vocab: int
    ctx: int
    tok: Any


# -- leak checks from the workers' pools -----------------------------------------------------------
Figures = dict[str, dict[str, int]]


def idle(figures: Figures) -> bool:
    return all(
        f["used"] == 0 and f["requests"] == 0 and f["reservations"] == 0 for f in figures.values()
    )


def held(figures: Figures) -> bool:
    return any(f["used"] > 0 and f["requests"] > 0 for f in figures.values())


def settle(live: Live, done: Callable[[Figures], bool], timeout_s: float = 30.0) -> Figures:
    """Poll the pools (and, for idle, the controller's request table) until ``done`` or the
    deadline; returns the last figures."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = live.cluster.integrity()
        in_flight = live.cluster.counters()["in_flight"] if done is idle else 0
        if (done(figures) and in_flight == 0) or time.monotonic() > deadline:
            return figures
        threading.Event().wait(0.05)  # poll interval


def assert_no_leak(live: Live) -> None:
    figures = settle(live, idle)
    assert set(figures) == set(live.workers), f"a worker died: {figures}"
    assert idle(figures), f"KV blocks, requests or reservations left: {figures}"
    assert live.cluster.counters()["in_flight"] == 0


def sdk(live: Live, key: str | None = USER_KEY, timeout: float = 60) -> Client:
    return Client(live.grpc_target, api_key=key, root_cert=live.cert, timeout=timeout)


def trusting(live: Live) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(live.cert))


def oai_client(live: Live, key: str = USER_KEY, *, trust: bool = True) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"https://localhost:{live.http_port}/v1",
        api_key=key,
        max_retries=0,
        timeout=60,
        http_client=openai.DefaultHttpxClient(verify=trusting(live)) if trust else None,
    )


def https(live: Live, timeout: float = 30) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        "localhost", live.http_port, timeout=timeout, context=trusting(live)
    )


def grpc_call(live: Live, data: bytes) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=live.cert.read_bytes())
    with grpc.secure_channel(live.grpc_target, creds) as ch:
        call = ch.unary_stream("/kvrelay.v1.Generation/Generate")  # identity serializers
        try:
            for _ in call(data, timeout=30, metadata=(("authorization", f"Bearer {USER_KEY}"),)):
                pass
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "server hung"
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def http_post(live: Live, path: str, data: bytes) -> tuple[int, bytes]:
    conn = https(live)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {USER_KEY}"}
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_keys_never_logged() -> None:
    """Nothing the cluster's processes wrote (Ray's per-session log files: the controller actor,
    the workers, raylet, GCS) contains a key. The frontends log in this process."""
    import ray

    node = ray._private.worker.global_worker.node  # no public API names the session folder
    assert node is not None
    logs = Path(node.get_session_dir_path()) / "logs"
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert any(f.name.startswith("worker-") for f in files), "no actor logs found"
    for f in files:
        data = f.read_bytes()
        assert USER_KEY.encode() not in data and ADMIN_KEY.encode() not in data, f
