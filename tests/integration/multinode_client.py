"""The user's side of test_multinode_netns.py: a client of a served kvrelay cluster that talks
only to its public API, run inside a host of the test's network.

    ip netns exec CLIENT_HOST python multinode_client.py SPEC_JSON

SPEC_JSON: ``{"grpc": "IP:PORT", "metrics": "http://IP:PORT/metrics", "prompts": [[ids]],
"params": {...}, "flow_threads": N}``. Everything it learns comes from the gRPC service
(Generate, Admin.ClusterStatus) and the Prometheus endpoint: which worker runs on which
node, the KV bytes each worker sent and received, resubmissions, and the KV pools' figures.
It talks to the test over a line protocol (``KVRELAY-CLIENT {"event": ...}`` lines on stdout,
command lines on stdin), so the test, which owns the hosts, can read link counters and add or
kill hosts in between:

    -> workers {workers}              <- go          (test read the link counters)
    -> phase1 {outputs, metrics}                     (16 concurrent greedy requests)
    -> flowing                        <- joined      (test started a fourth host's Ray node)
    -> busy {worker, metrics}         <- killed      (test killed every process of that host)
    -> done {results, errors, status, metrics}
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from kvrelay.client import Client

PREFIX = "KVRELAY-CLIENT "
PER_WORKER = (
    "kvrelay_kv_transfer_bytes_total",
    "kvrelay_kv_received_bytes_total",
    "kvrelay_kv_transfer_duration_seconds_count",
)
T = TypeVar("T")


def emit(event: str, **data: Any) -> None:
    print(PREFIX + json.dumps({"event": event, **data}), flush=True)


def expect(command: str) -> None:
    line = sys.stdin.readline().strip()
    if line != command:
        raise SystemExit(f"client: expected {command!r} from the test, got {line!r}")


def scrape(url: str) -> dict[str, Any]:
    """Per-worker transfer figures and the resubmission count from /metrics."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    workers: dict[str, dict[str, float]] = {}
    resubmissions = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in PER_WORKER:
                workers.setdefault(s.labels["worker"], {})[s.name] = s.value
            elif s.name == "kvrelay_request_resubmissions_total":
                resubmissions += s.value
    return {"workers": workers, "resubmissions": resubmissions}


def status(client: Client) -> dict[str, Any]:
    st = client.cluster_status(timeout=30)
    return {"in_flight": st.in_flight, "workers": [asdict(w) for w in st.workers]}


def wait_until(predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)  # polling the server's state: there is no event to wait on over the API
    raise SystemExit(f"client: timed out after {timeout_s}s waiting for {what}")


class Flow:
    """``threads`` clients sending the prompts round-robin until stopped; keeps every output."""

    def __init__(self, client: Client, prompts: list[list[int]], params: dict[str, Any],
                 threads: int) -> None:
        self.client, self.prompts, self.params = client, prompts, params
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[int, list[int]]] = []
        self.errors: list[str] = []
        self.next = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                i, self.next = self.next % len(self.prompts), self.next + 1
            try:
                out = self.client.generate(token_ids=self.prompts[i], timeout=240, **self.params)
            except Exception as exc:  # reported to the test, which fails on it
                with self.lock:
                    self.errors.append(repr(exc))
                continue
            with self.lock:
                self.results.append((i, list(out.token_ids)))

    def completed(self) -> int:
        with self.lock:
            return len(self.results)

    def finish(self, timeout_s: float) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout_s)
        if any(t.is_alive() for t in self.threads):
            raise SystemExit(f"client: flow requests still waiting after {timeout_s}s")


def settled(client: Client) -> Callable[[], dict[str, Any] | None]:
    """The cluster status once nothing is in flight and every pool is empty."""

    def check() -> dict[str, Any] | None:
        st = status(client)
        quiet = st["in_flight"] == 0 and all(
            w["running"] == 0 and w["waiting"] == 0
            and all(tier.get("used", 0) == 0 for tier in w["kv_blocks"].values())
            for w in st["workers"]
        )
        return st if quiet else None

    return check


def main(spec: dict[str, Any]) -> None:
    client = Client(spec["grpc"])
    url, params = spec["metrics"], spec["params"]
    prompts: list[list[int]] = spec["prompts"]
    emit("workers", status=status(client))
    expect("go")

    # ---- 16 concurrent requests; then the workers' transfer figures once both reported them
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(client.generate, token_ids=p, timeout=240, **params) for p in prompts]
        outputs = [list(f.result().token_ids) for f in futures]

    def reported() -> dict[str, Any] | None:
        m = scrape(url)
        figures = m["workers"].values()
        transfers = sum(f.get("kvrelay_kv_transfer_duration_seconds_count", 0) for f in figures)
        sent = sum(f.get("kvrelay_kv_transfer_bytes_total", 0) for f in figures)
        received = sum(f.get("kvrelay_kv_received_bytes_total", 0) for f in figures)
        return m if transfers >= len(prompts) and received >= sent > 0 else None

    emit("phase1", outputs=outputs, metrics=wait_until(reported, 60, "transfer metrics"))

    # ---- a fourth host joins while requests flow
    flow = Flow(client, prompts, params, spec["flow_threads"])
    emit("flowing")
    expect("joined")
    known = {w["worker_id"] for w in status(client)["workers"]}

    def new_worker_busy() -> dict[str, Any] | None:
        fresh = [w for w in status(client)["workers"] if w["worker_id"] not in known]
        return fresh[0] if fresh and fresh[0]["running"] >= 1 else None

    new = wait_until(new_worker_busy, 240, "a worker on the new host to decode requests")
    wid = new["worker_id"]

    def received_by_new() -> dict[str, Any] | None:
        m = scrape(url)
        return m if m["workers"].get(wid, {}).get("kvrelay_kv_received_bytes_total", 0) else None

    emit("busy", worker=new, completed_before=flow.completed(),
         metrics=wait_until(received_by_new, 60, f"{wid} to report KV received"))
    expect("killed")

    # ---- the host vanished: its worker leaves the status, the flow goes on, pools settle
    wait_until(lambda: all(w["worker_id"] != wid for w in status(client)["workers"]) or None,
               60, f"the cluster to drop {wid}")
    at_kill = flow.completed()
    wait_until(lambda: flow.completed() >= at_kill + 8 or None, 240, "requests after the kill")
    flow.finish(240)
    final = wait_until(settled(client), 60, "pools to settle")
    emit("done", results=flow.results, errors=flow.errors, status=final, metrics=scrape(url))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
