"""Kubernetes watcher against a stand-in API server on loopback.

The stand-in speaks what the real ``kubernetes`` client expects: ``GET /api/v1/nodes`` and
``GET /api/v1/namespaces/{ns}/pods`` return lists with a resourceVersion; with ``watch=true``
they answer a chunked stream of JSON lines ``{"type": ..., "object": ...}`` until the
request's ``timeoutSeconds`` or the server's shutdown.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from kvrelay.cluster.spot.k8s_watcher import K8sWatchConfig, K8sWatcher, classify_node, classify_pod
from kvrelay.cluster.spot.notices import NoticeKind, PreemptionNotice

WAIT_S = 10.0


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def node(name: str, taints: list[dict] | None = None, labels: dict | None = None) -> dict:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": "5", "labels": labels or {}},
        "spec": {"taints": taints or []},
    }


def pod(name: str, node_name: str, uid: str, deletion: float | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": "serve", "uid": uid, "resourceVersion": "7"}
    if deletion is not None:
        meta["deletionTimestamp"] = rfc3339(deletion)
        meta["deletionGracePeriodSeconds"] = 30
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {"nodeName": node_name, "terminationGracePeriodSeconds": 30},
    }


class FakeApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.items: dict[str, list[dict]] = {"nodes": [], "pods": []}
        self.events: dict[str, queue.Queue[dict]] = {"nodes": queue.Queue(), "pods": queue.Queue()}
        self.fail_lists = 0  # answer the next N list requests with 500
        self.requests: list[str] = []
        self.closing = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeApi

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = parse_qs(url.query)
        self.server.requests.append(self.path)
        if url.path == "/api/v1/nodes":
            res = "nodes"
        elif url.path == "/api/v1/namespaces/serve/pods":
            res = "pods"
        else:
            self._json(404, {"kind": "Status", "code": 404})
            return
        if q.get("watch", ["false"])[0] in ("true", "True", "1"):
            self._watch(res, float(q.get("timeoutSeconds", ["30"])[0]))
        elif self.server.fail_lists > 0:
            self.server.fail_lists -= 1
            self._json(500, {"kind": "Status", "code": 500, "message": "boom"})
        else:
            kind = "NodeList" if res == "nodes" else "PodList"
            self._json(
                200,
                {
                    "kind": kind,
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "10"},
                    "items": self.server.items[res],
                },
            )

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, res: str, timeout_s: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        end = time.monotonic() + timeout_s
        events = self.server.events[res]
        try:
            while time.monotonic() < end and not self.server.closing.is_set():
                try:
                    ev = events.get(timeout=0.05)  # a bounded wait, to notice shutdown
                except queue.Empty:
                    continue
                line = (json.dumps(ev) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.closing.set()
    server.shutdown()
    server.server_close()
    t.join(WAIT_S)


@pytest.fixture
def notices() -> queue.Queue[PreemptionNotice]:
    return queue.Queue()


def start(api: FakeApi, sink: queue.Queue[PreemptionNotice], **kw: Any) -> K8sWatcher:
    conf = client.Configuration(host=f"http://127.0.0.1:{api.server_address[1]}")
    cfg = K8sWatchConfig(retry_backoff_s=0.05, watch_timeout_s=30, **kw)
    w = K8sWatcher(cfg, sink.put, client.ApiClient(conf))
    w.start()
    return w


def test_node_taints_from_list_and_watch(api: FakeApi, notices: queue.Queue) -> None:
    added = time.time() - 10
    api.items["nodes"] = [
        node(
            "spot-a",
            [
                {
                    "key": "aws-node-termination-handler/spot-itn",
                    "effect": "NoSchedule",
                    "timeAdded": rfc3339(added),
                }
            ],
        ),
        node("calm", [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]),
    ]
    w = start(api, notices)
    try:
        n = notices.get(timeout=WAIT_S)
        assert (n.target, n.kind, n.source) == ("spot-a", NoticeKind.NODE, "k8s-node")
        assert n.deadline_s == pytest.approx(added + 120, abs=1)
        assert "spot-itn" in n.reason
        gcp = {"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}
        t0 = time.time()
        api.events["nodes"].put({"type": "MODIFIED", "object": node("calm")})
        api.events["nodes"].put({"type": "MODIFIED", "object": node("spot-b", [gcp])})
        api.events["nodes"].put({"type": "MODIFIED", "object": node("spot-b", [gcp])})  # repeat
        api.events["nodes"].put({"type": "DELETED", "object": node("spot-b", [gcp])})
        api.events["nodes"].put({"type": "DELETED", "object": node("gone")})
        n = notices.get(timeout=WAIT_S)
        assert n.target == "spot-b" and t0 + 29 <= n.deadline_s <= time.time() + 30
        n = notices.get(timeout=WAIT_S)  # the repeat and the announced deletion said nothing
        assert (n.target, n.reason) == ("gone", "node deleted")
        assert n.deadline_s <= time.time()
        assert notices.empty()
        assert any("watch=true" in r or "watch=True" in r for r in api.requests)
    finally:
        w.stop()
    assert not any(t.is_alive() for t in w._threads)


def test_pod_deletion_carries_node(api: FakeApi, notices: queue.Queue) -> None:
    api.fail_lists = 1  # the first list fails: the watcher logs, backs off, lists again
    w = start(
        api, notices, pod_namespace="serve", pod_label_selector="app=kvrelay", watch_nodes=False
    )
    try:
        deletion = time.time() + 25
        api.events["pods"].put({"type": "MODIFIED", "object": pod("w1", "node-1", "u1")})
        api.events["pods"].put({"type": "MODIFIED", "object": pod("w1", "node-1", "u1", deletion)})
        api.events["pods"].put({"type": "MODIFIED", "object": pod("w1", "node-1", "u1", deletion)})
        api.events["pods"].put({"type": "DELETED", "object": pod("w1", "node-1", "u1", deletion)})
        api.events["pods"].put({"type": "DELETED", "object": pod("w2", "node-2", "u2")})
        n = notices.get(timeout=WAIT_S)
        assert (n.target, n.kind, n.node, n.source) == (
            "serve/w1",
            NoticeKind.POD,
            "node-1",
            "k8s-pod",
        )
        assert n.deadline_s == pytest.approx(deletion, abs=1)
        n = notices.get(timeout=WAIT_S)
        assert (n.target, n.node, n.reason) == ("serve/w2", "node-2", "pod deleted")
        assert notices.empty()
        assert w.errors >= 1
        assert any("labelSelector=app%3Dkvrelay" in r for r in api.requests)
    finally:
        w.stop()


def test_classifiers_pure() -> None:
    cfg = K8sWatchConfig(
        labels={"example.com/terminating=true": 5.0},
        taints={"x/soon": None, "x/now": 1.0},
        default_grace_s=60,
    )
    now = 1000.0
    assert classify_node("MODIFIED", node("n"), cfg, now) is None
    both = node("n", [{"key": "x/soon"}, {"key": "x/now"}])
    got = classify_node("MODIFIED", both, cfg, now)
    assert got is not None and got.deadline_s == 1001.0 and "x/now" in got.reason
    lab = classify_node("MODIFIED", node("n", labels={"example.com/terminating": "true"}), cfg, now)
    assert lab is not None and lab.deadline_s == 1005.0
    assert (
        classify_node("MODIFIED", node("n", labels={"example.com/terminating": "no"}), cfg, now)
        is None
    )
    assert classify_pod("MODIFIED", pod("p", "n", "u"), cfg, now) is None
    bad_ts = pod("p", "n", "u", 0)
    bad_ts["metadata"]["deletionTimestamp"] = "garbage"
    got = classify_pod("MODIFIED", bad_ts, cfg, now)
    assert got is not None and got.deadline_s == now + 30  # deletionGracePeriodSeconds
    with pytest.raises(ValueError):
        K8sWatchConfig(default_grace_s=-1)
