"""kvrelay across real network hosts: Ray nodes in separate network namespaces on one machine.

Hosts (tests/netns_hosts.py): ``head`` (Ray head; ``kvrelay serve`` with the controller, its
gRPC / HTTP frontends and the KV rendezvous store; the user's client), ``p`` (advertises
``kvrelay_prefill``), ``d`` (``kvrelay_decode``), each with its own address on a bridge; later
``e`` (``kvrelay_decode``) joins while requests flow, and then every one of its processes is
killed. The Ray nodes are started with ``kvrelay node`` (cluster/cli/node.py); the cluster
with ``kvrelay serve --address HEAD --placement-resource-prefix kvrelay_``, exactly as an
operator would; the client (multinode_client.py) uses only the public API (gRPC Generate and
Admin.ClusterStatus, Prometheus /metrics) and reports over a line protocol, so this process
can read the link counters and add or kill hosts in between.

What it shows (issue 10): greedy outputs of 16 concurrent requests identical to the colocated
engine's with prefill on one host and decode on another; the KV bytes the prefill worker sent
equal those the decode worker received (each from its own host's counters) and the prompt
blocks' size, and the veth link carried at least those bytes; the fourth host is noticed by
the running controller, gets a decode worker that takes requests, and when it vanishes its
requests finish elsewhere with the same tokens and no KV block is left held.

Needs root and iproute2 (skips otherwise). Ray token auth is off (RAY_AUTH_MODE=disabled):
the hosts exist only inside this machine and have no route out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # ~60 s when the machine is quiet

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "multinode_client.py"
KVRELAY = Path(sys.executable).parent / "kvrelay"  # the console script of this environment
RAY_PORT = 6379  # inside the head's namespace: nothing else listens there
GRPC_PORT, HTTP_PORT = 50051, 8000
TOPICS = [
    "the moon",
    "volcanoes",
    "a lighthouse",
    "bread",
    "chess",
    "rivers",
    "paper",
    "octopuses",
    "rain",
    "jazz",
    "glaciers",
    "bees",
    "computers",
    "cacti",
    "trains",
    "origami",
]
GREEDY = {"max_tokens": 32, "temperature": 0.0, "ignore_eos": True}
# Ray notices a vanished node within ~2 s instead of ~15 s (GCS reads RAY_<config> variables).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def _load_netns() -> Any:
    spec = importlib.util.spec_from_file_location(
        "kvrelay_netns_hosts", HERE.parent / "netns_hosts.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


netns = _load_netns()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Prompts and the colocated engine's greedy tokens."""
    llm = LLM(None, threads=2)
    prompts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me about {t}." + " Be precise." * (i % 4)}]
        )
        for i, t in enumerate(TOPICS)
    ]
    expected = [list(c.token_ids) for c in llm.generate(prompts, SamplingParams(**GREEDY))]
    # one handoff per request moves every block of its prompt (the last one partly filled)
    blocks = sum(-(-len(p) // llm.engine.config.block_size) for p in prompts)
    return {"prompts": prompts, "expected": expected, "kv_bytes": blocks * llm.engine.block_bytes}


@pytest.fixture
def hosts() -> Iterator[Any]:
    reason = netns.why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with netns.NetnsHosts(["head", "p", "d"]) as h:
        yield h


def _node(hosts: Any, host: str, role: str, *args: str) -> subprocess.Popen:
    """``kvrelay node`` on ``host`` (ray start daemonizes; the command itself returns)."""
    argv = [
        sys.executable,
        "-m",
        "kvrelay.cluster.cli.node",
        "--role",
        role,
        f"--node-ip-address={hosts.ip(host)}",
        f"--temp-dir={hosts.temp_dir(host)}",
        "--object-store-bytes=80000000",
        *args,
    ]
    env = {**os.environ, **RAY_ENV}
    return hosts.popen(
        host, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _started(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]


def _join(hosts: Any, host: str, role: str) -> subprocess.Popen:
    return _node(hosts, host, role, f"--address={hosts.ip('head')}:{RAY_PORT}", "--num-cpus=1")


class Serve:
    """``kvrelay serve --address HEAD`` in the head host: the controller with its public
    frontends joins the Ray cluster the test built and places each pool by node resource."""

    def __init__(self, hosts: Any, log: Path) -> None:
        ip = hosts.ip("head")
        argv = [
            str(KVRELAY), "serve", f"--address={ip}:{RAY_PORT}",
            "--placement-resource-prefix=kvrelay_", "--transport-interface=eth0",
            "--prefill-workers=1", "--decode-workers=1", "--threads-per-worker=1",
            f"--host={ip}", f"--grpc-port={GRPC_PORT}", f"--http-port={HTTP_PORT}",
            "--kv-cache-gb=0.15",
            # Load-based routing and a handoff for every request: the flow repeats its prompts,
            # and a prefix-aware router would keep them on the decode worker that cached them,
            # so the joining host would get no work (this test is about hosts, not routing).
            "--router=least_loaded", "--no-conditional-disagg", "--no-prefix-pull",
        ]
        self.log = log
        self._out = log.open("w")
        self.proc = hosts.popen(
            "head", argv, env={**os.environ, **RAY_ENV}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.write(line)
            self._out.flush()
            if line.startswith("kvrelay serving"):
                self.ready.set()
        self.ready.set()  # exited: wait() returns, the caller checks the process

    def wait_ready(self, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s) or self.proc.poll() is not None:
            pytest.fail(f"kvrelay serve did not come up; its output:\n{self.log.read_text()[-4000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve shuts the cluster down on SIGTERM
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._out.close()


class UserClient:
    """multinode_client.py in the head host; its protocol lines arrive on a queue."""

    def __init__(self, hosts: Any, spec: dict[str, Any], log: Path) -> None:
        self.log = log
        self._err = log.open("w")
        self.proc = hosts.popen(
            "head",
            [sys.executable, str(CLIENT), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("KVRELAY-CLIENT "):
                self.lines.put(json.loads(line.split(" ", 1)[1]))
        self.lines.put(None)  # the client exited

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            msg = None
        if msg is None or msg["event"] != event:
            tail = self.log.read_text()[-4000:]
            pytest.fail(f"client: wanted {event!r}, got {msg!r}; client stderr:\n{tail}")
        return msg

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._err.close()


def test_pools_on_separate_hosts_relay_kv_over_the_link(
    hosts: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    head = _node(hosts, "head", "none", "--head", f"--port={RAY_PORT}", "--num-cpus=0")
    _started(head)
    _started(_join(hosts, "p", "prefill"), _join(hosts, "d", "decode"))

    serve = Serve(hosts, tmp_path / "serve.log")
    client = None
    try:
        serve.wait_ready(300)
        ip = hosts.ip("head")
        spec = {
            "grpc": f"{ip}:{GRPC_PORT}",
            "metrics": f"http://{ip}:{HTTP_PORT}/metrics",
            "prompts": reference["prompts"],
            "params": GREEDY,
            "flow_threads": 6,
        }
        client = UserClient(hosts, spec, tmp_path / "client.log")
        _run(hosts, client, reference)
    finally:
        if client is not None:
            client.close()
        serve.close()


def _figure(metrics: dict[str, Any], worker: str, name: str) -> float:
    return float(metrics["workers"].get(worker, {}).get(name, 0.0))


def _run(hosts: Any, client: UserClient, reference: dict[str, Any]) -> None:
    # ---- placement: each pool on the host that advertises its role (Admin.ClusterStatus)
    msg = client.expect("workers", 120)
    by_role = {w["role"]: w for w in msg["status"]["workers"]}
    assert set(by_role) == {"prefill", "decode"}, msg
    assert by_role["prefill"]["node"] == hosts.ip("p")
    assert by_role["decode"]["node"] == hosts.ip("d")
    p_id, d_id = by_role["prefill"]["worker_id"], by_role["decode"]["worker_id"]

    # ---- three hosts: 16 concurrent greedy requests, KV over the veth link
    before = {h: hosts.link_bytes(h) for h in ("p", "d")}
    client.send("go")
    msg = client.expect("phase1", 300)
    after = {h: hosts.link_bytes(h) for h in ("p", "d")}
    assert msg["outputs"] == reference["expected"]
    m = msg["metrics"]
    sent = _figure(m, p_id, "kvrelay_kv_transfer_bytes_total")
    received = _figure(m, d_id, "kvrelay_kv_received_bytes_total")
    assert _figure(m, p_id, "kvrelay_kv_transfer_duration_seconds_count") == len(reference["prompts"])
    assert sent == received == reference["kv_bytes"] > 0
    assert _figure(m, d_id, "kvrelay_kv_transfer_bytes_total") == 0  # one direction only
    p_tx = after["p"][1] - before["p"][1]
    d_rx = after["d"][0] - before["d"][0]
    assert p_tx >= sent and d_rx >= received, (p_tx, d_rx, sent)

    # ---- a fourth host joins while requests flow, takes decode work, then vanishes
    client.expect("flowing", 60)
    hosts.add("e")
    _started(_join(hosts, "e", "decode"))
    client.send("joined")
    busy = client.expect("busy", 360)
    new = busy["worker"]
    assert new["role"] == "decode" and new["node"] == hosts.ip("e"), new
    e_received = _figure(busy["metrics"], new["worker_id"], "kvrelay_kv_received_bytes_total")
    assert e_received > 0  # KV relayed to it over its own link
    assert hosts.link_bytes("e")[0] >= e_received
    assert hosts.kill("e") > 0
    client.send("killed")
    done = client.expect("done", 420)

    assert done["errors"] == []
    workers = {w["worker_id"]: w for w in done["status"]["workers"]}
    assert set(workers) == {p_id, d_id}, workers  # the vanished host's worker is gone
    assert done["metrics"]["resubmissions"] >= 1  # its in-flight requests moved
    for i, tokens in done["results"]:
        assert tokens == reference["expected"][i], f"prompt {i} changed after the host vanished"
    assert len(done["results"]) >= busy["completed_before"] + 8
    for wid, w in workers.items():  # settled: nothing in flight, no KV block held anywhere
        assert w["running"] == w["waiting"] == 0, (wid, w)
        assert all(t.get("used", 0) == 0 for t in w["kv_blocks"].values()), (wid, w)
    assert done["status"]["in_flight"] == 0
