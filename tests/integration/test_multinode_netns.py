"""kvrelay across real network hosts: Ray nodes in separate network namespaces on one machine.

Hosts (tests/netns_hosts.py): ``head`` (Ray head, the driver, the controller and the KV
rendezvous store), ``p`` (advertises ``kvrelay_prefill``), ``d`` (``kvrelay_decode``), each
with its own address on a bridge; later ``e`` (``kvrelay_decode``) joins while requests flow,
and then every one of its processes is killed. The Ray nodes are started with ``kvrelay node``
(cluster/node_cli.py); the kvrelay side runs in multinode_driver.py inside ``head`` and reports
over a line protocol, so this process can read the link counters and add or kill hosts.

What it shows (issue 10): greedy outputs of 16 concurrent requests identical to the colocated
engine's with prefill on one host and decode on another; the transport's byte counters on
both hosts agree with each other and with the controller's, and the veth link carried at
least those bytes; the fourth host is noticed, gets a decode worker that takes requests, and
when it vanishes its requests finish elsewhere with the same tokens and no pool leaks.

Needs root and iproute2 (skips otherwise). Ray token auth is off (RAY_AUTH_MODE=disabled):
the hosts exist only inside this machine and have no route out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
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
DRIVER = HERE / "multinode_driver.py"
RAY_PORT = 6379  # inside the head's namespace: nothing else listens there
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
    return {"prompts": prompts, "expected": expected}


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
        "kvrelay.cluster.node_cli",
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


class Driver:
    """multinode_driver.py in the head host; its protocol lines arrive on a queue."""

    def __init__(self, hosts: Any, spec: dict[str, Any], log: Path) -> None:
        self.log = log
        self._err = log.open("w")
        self.proc = hosts.popen(
            "head",
            [sys.executable, str(DRIVER), json.dumps(spec)],
            env={**os.environ, **RAY_ENV},
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
            if line.startswith("KVRELAY-DRIVER "):
                self.lines.put(json.loads(line.split(" ", 1)[1]))
        self.lines.put(None)  # the driver exited

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            msg = None
        if msg is None or msg["event"] != event:
            tail = self.log.read_text()[-4000:]
            pytest.fail(f"driver: wanted {event!r}, got {msg!r}; driver stderr:\n{tail}")
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

    spec = {
        "address": f"{hosts.ip('head')}:{RAY_PORT}",
        "head_ip": hosts.ip("head"),
        "interface": "eth0",
        "prompts": reference["prompts"],
        "params": GREEDY,
        "flow_threads": 6,
    }
    driver = Driver(hosts, spec, tmp_path / "driver.log")
    try:
        _run(hosts, driver, reference)
    finally:
        driver.close()


def _run(hosts: Any, driver: Driver, reference: dict[str, Any]) -> None:
    # ---- placement: each pool on the host that advertises its role
    msg = driver.expect("workers", 240)
    by_role = {w["role"]: w for w in msg["workers"]}
    assert by_role["prefill"]["reported_ip"] == hosts.ip("p")
    assert by_role["decode"]["reported_ip"] == hosts.ip("d")
    p_id, d_id = by_role["prefill"]["worker"], by_role["decode"]["worker"]

    # ---- three hosts: 16 concurrent greedy requests, KV over the veth link
    before = {h: hosts.link_bytes(h) for h in ("p", "d")}
    driver.send("go")
    msg = driver.expect("phase1", 240)
    after = {h: hosts.link_bytes(h) for h in ("p", "d")}
    assert msg["outputs"] == reference["expected"]
    sent = msg["totals"][p_id]["bytes_sent"]
    received = msg["totals"][d_id]["bytes_received"]
    assert msg["counters"]["handoffs"] == len(reference["prompts"])
    assert sent == received == msg["counters"]["handoff_bytes"] > 0
    p_tx = after["p"][1] - before["p"][1]
    d_rx = after["d"][0] - before["d"][0]
    assert p_tx >= sent and d_rx >= received, (p_tx, d_rx, sent)

    # ---- a fourth host joins while requests flow, takes decode work, then vanishes
    driver.expect("flowing", 60)
    hosts.add("e")
    _started(_join(hosts, "e", "decode"))
    driver.send("joined")
    busy = driver.expect("busy", 360)
    assert busy["registered"] and busy["worker"]["reported_ip"] == hosts.ip("e")
    assert busy["totals"]["bytes_received"] > 0  # KV relayed to it over its own link
    assert hosts.link_bytes("e")[0] >= busy["totals"]["bytes_received"]
    assert hosts.kill("e") > 0
    driver.send("killed")
    done = driver.expect("done", 420)

    assert done["errors"] == []
    assert done["left"] == [hosts.ip("e")]
    assert busy["worker"]["worker"] not in done["workers"]
    assert done["counters"]["resubmissions"] >= 1  # its in-flight requests moved
    for i, tokens in done["results"]:
        assert tokens == reference["expected"][i], f"prompt {i} changed after the host vanished"
    assert len(done["results"]) >= busy["completed_before"] + 8
    for wid, figures in done["integrity"].items():
        assert figures["used"] == 0 and figures["requests"] == 0, (wid, figures)
        assert figures["reservations"] == 0, (wid, figures)
    assert set(done["integrity"]) == {p_id, d_id}
