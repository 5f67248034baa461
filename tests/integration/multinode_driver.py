"""The kvrelay side of test_multinode_netns.py: run inside the head host's network namespace.

    ip netns exec HEAD python multinode_driver.py SPEC_JSON

It joins the Ray cluster the test built, starts kvrelay (``Cluster.start``) with the
controller and rendezvous store on the head host, places one prefill and one decode worker
with cluster/placement.py (NodeAffinity to the hosts that advertise ``kvrelay_prefill`` /
``kvrelay_decode``), and talks to the test over a line protocol: it prints
``KVRELAY-DRIVER {"event": ...}`` lines on stdout and waits for command lines on stdin, so
the test (which owns the hosts) can read link counters and add or kill hosts in between.

    -> workers {ids, nodes}          <- go          (test read the link counters)
    -> phase1 {outputs, totals}                     (16 concurrent greedy requests)
    -> flowing                       <- joined      (test started a fourth host's Ray node)
    -> busy {worker, node}           <- killed      (test killed every process of that host)
    -> done {outputs, counters, integrity, workers}

Until ``ControllerActor.add_worker`` takes placement options, workers are created here with
the same arguments it uses, then registered with the controller.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from kvrelay.cluster.actors import WorkerActor, _ControllerSink
from kvrelay.cluster.node_pools import NodeWatcher
from kvrelay.cluster.placement import (
    PlacedWorker,
    Placement,
    PlacementPolicy,
    check_transport_host,
    fill_plan,
    place,
)
from kvrelay.cluster.serve import Cluster, ServeConfig
from kvrelay.cluster.worker_client import RayWorkerClient
from kvrelay.workers.engine import EngineConfig
from kvrelay.workers.types import SamplingParams

PREFIX = "KVRELAY-DRIVER "


def emit(event: str, **data: Any) -> None:
    print(PREFIX + json.dumps({"event": event, **data}), flush=True)


def expect(command: str) -> None:
    line = sys.stdin.readline().strip()
    if line != command:
        raise SystemExit(f"driver: expected {command!r} from the test, got {line!r}")


class Workers:
    """Workers this driver placed: handles and where they run."""

    def __init__(self, cluster: Cluster, store: tuple[str, int], policy: PlacementPolicy):
        self.cluster, self.store, self.policy = cluster, store, policy
        self.placed: list[PlacedWorker] = []
        self.handles: dict[str, Any] = {}

    def start(self, placements: list[Placement]) -> list[dict[str, Any]]:
        cfg = self.cluster.cfg
        engine = EngineConfig(
            block_size=cfg.block_size,
            kv_cache_gb=cfg.kv_cache_gb,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching,
        )
        made = []
        for p in placements:
            wid = f"{p.role[0]}-{len(self.placed)}"
            handle = WorkerActor.options(  # type: ignore[attr-defined]
                name=f"kvrelay-worker-{wid}", max_concurrency=32, **p.actor_options()
            ).remote(
                wid,
                p.role,
                model=cfg.model,
                engine_config=engine,
                sink=_ControllerSink(self.cluster.controller),
                rendezvous=self.store,
                threads=p.threads,
            )
            self.handles[wid] = handle
            self.placed.append(PlacedWorker(wid, p.role, p.node_id))
            made.append((wid, p, handle))
        infos = ray.get(
            [self.cluster.controller.register.remote(RayWorkerClient(w, h)) for w, _, h in made]
        )
        return [
            {"worker": w, "role": p.role, "node_ip": p.node_ip, "reported_ip": info.node_ip}
            for (w, p, _), info in zip(made, infos, strict=True)
        ]

    def kill_all(self) -> None:
        for handle in self.handles.values():
            ray.kill(handle, no_restart=True)

    def totals(self, wids: list[str]) -> dict[str, dict[str, float]]:
        return dict(
            zip(
                wids,
                ray.get([self.handles[w].transport_totals.remote() for w in wids]),
                strict=True,
            )
        )


def run_batch(
    cluster: Cluster, prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(cluster.complete, p, params) for p in prompts]
        return [f.result(timeout=120)[0] for f in futures]


class Flow:
    """``threads`` clients sending the prompts round-robin until stopped; keeps every output."""

    def __init__(
        self, cluster: Cluster, prompts: list[list[int]], params: SamplingParams, threads: int
    ) -> None:
        self.cluster, self.prompts, self.params = cluster, prompts, params
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[int, list[int]]] = []
        self.errors: list[str] = []
        self.next = 0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                i, self.next = self.next % len(self.prompts), self.next + 1
            try:
                tokens, _ = self.cluster.complete(self.prompts[i], self.params)
            except Exception as exc:  # reported to the test, which fails on it
                with self.lock:
                    self.errors.append(repr(exc))
                continue
            with self.lock:
                self.results.append((i, tokens))

    def completed(self) -> int:
        with self.lock:
            return len(self.results)

    def finish(self, timeout_s: float) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout_s)
        stuck = sum(t.is_alive() for t in self.threads)
        if stuck:
            counters = self.cluster.counters()
            raise SystemExit(
                f"driver: {stuck} flow clients still waiting after {timeout_s}s; "
                f"controller counters {counters}"
            )


def wait_until(predicate: Any, timeout_s: float, what: str, pause_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause_s)  # polling remote state (no event to wait on across processes)
    raise SystemExit(f"driver: timed out after {timeout_s}s waiting for {what}")


def main(spec: dict[str, Any]) -> None:
    head_ip = spec["head_ip"]
    cfg = ServeConfig(
        address=spec["address"],
        prefill_workers=0,
        decode_workers=0,
        grpc_port=None,
        http_port=None,
        threads_per_worker=1,
        transport_host=head_ip,
        handoff_timeout_s=20.0,
        kv_cache_gb=0.15,
        # Load-based routing and a handoff for every request: the flow repeats its prompts, and
        # a prefix-aware router would keep them on the decode worker that cached them, so the
        # joining host would get no work (this test is about hosts, not routing).
        router="least_loaded",
        conditional_disagg=False,
        prefix_pull=False,
    )
    cluster = start_pinned(cfg)
    policy = PlacementPolicy(interface=spec["interface"])
    workers = Workers(cluster, (head_ip, int(cluster.ports["store_port"])), policy)
    try:
        watcher = NodeWatcher()
        watcher.poll()
        check_transport_host(head_ip, watcher.nodes)
        infos = workers.start(
            [place(r, watcher.nodes, workers.placed, policy) for r in ("prefill", "decode")]
        )
        emit("workers", workers=infos)
        expect("go")

        prompts, params = spec["prompts"], SamplingParams(**spec["params"])
        outputs = run_batch(cluster, prompts, params)
        emit(
            "phase1",
            outputs=outputs,
            totals=workers.totals(list(workers.handles)),
            counters=cluster.counters(),
        )

        flow = Flow(cluster, prompts, params, spec["flow_threads"])
        emit("flowing")
        expect("joined")
        diff = wait_until(lambda: watcher.poll().joined, 120, "the new node to show up")
        plan = fill_plan(watcher.nodes, workers.placed, policy, only=[n.node_id for n in diff])
        (new,) = workers.start(plan)
        wid = new["worker"]
        handle = workers.handles[wid]
        wait_until(
            lambda: ray.get(handle.heartbeat.remote()).stats.running >= 1,
            180,
            f"{wid} to decode requests",
        )
        emit(
            "busy",
            worker=new,
            completed_before=flow.completed(),
            registered=wid in cluster.workers(),
            totals=workers.totals([wid])[wid],
        )
        expect("killed")
        wait_until(lambda: wid not in cluster.workers(), 60, f"the controller to drop {wid}")
        left = wait_until(lambda: watcher.poll().left, 60, "the node to be seen leaving")
        at_kill = flow.completed()
        wait_until(lambda: flow.completed() >= at_kill + 8, 240, "requests after the kill")
        flow.finish(240)
        integrity = wait_until(_settled(cluster), 60, "pools to settle")
        emit(
            "done",
            results=flow.results,
            errors=flow.errors,
            counters=cluster.counters(),
            integrity=integrity,
            workers=cluster.workers(),
            new_worker=new,
            left=[n.ip for n in left],
            totals=workers.totals([w for w in workers.handles if w != wid]),
        )
    except BaseException as exc:
        # Ray's core worker may end the process during shutdown before Python prints the
        # traceback: tell the test first.
        emit("error", message=repr(exc))
        raise
    finally:
        workers.kill_all()
        cluster.shutdown()


def start_pinned(cfg: ServeConfig) -> Cluster:
    """``Cluster.start`` with the controller pinned to this (the head) node: unpinned, Ray may
    put it on any node, and its rendezvous store must bind this host's address."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kvrelay.cluster.actors import ControllerActor

    ray.init(address=cfg.address, namespace="kvrelay", log_to_driver=False)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    controller = ControllerActor.options(  # type: ignore[attr-defined]
        name="kvrelay-controller", num_cpus=0, max_concurrency=10_000, scheduling_strategy=here
    ).remote(cfg)
    return Cluster(cfg, controller, ray.get(controller.start_services.remote()), owns_ray=True)


def _settled(cluster: Cluster) -> Any:
    def check() -> dict[str, dict[str, int]] | None:
        figures = cluster.integrity()
        quiet = all(
            f["used"] == 0 and f["requests"] == 0 and f["reservations"] == 0
            for f in figures.values()
        )
        return figures if quiet and cluster.counters()["in_flight"] == 0 else None

    return check


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
