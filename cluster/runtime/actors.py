"""Ray wrappers: the controller as an async actor, workers as threaded actors (a blocking KV
transfer in one method must not stop heartbeats or aborts).

The frontends do not run here: they run in the driver (cluster/runtime/frontends.py) and call
this actor; it keeps the metrics registry, which they feed (``observe_requests_finished``, a
batch of ended requests a call) and serve (``render_metrics``)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import itertools
import logging
import threading
import time
import uuid
from typing import Any

import ray

from kvrelay.cluster.api.backend import ModelInfo
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.controller import Controller
from kvrelay.cluster.controller.supervisor import Supervision
from kvrelay.cluster.controller.worker_client import RayWorkerClient
from kvrelay.cluster.placement.node_pools import NodePools, local_node_ip
from kvrelay.cluster.placement.placement import (
    Placement,
    PlacementPolicy,
    check_transport_host,
    gpu_share,
)
from kvrelay.cluster.routing.adapter import RoutingConfig
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.sizing.autosize import AutosizeConfig
from kvrelay.cluster.spot.metadata_poller import MetadataPoller, MetadataPollerConfig
from kvrelay.cluster.spot.notices import PreemptionNotice, queue_sink
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.prefill_graphs import MAX_TOKENS
from kvrelay.workers.model.config import resolve_device_dtype
from kvrelay.workers.model.source import load_tokenizer
from kvrelay.workers.model.sparse_attention import SparseConfig
from kvrelay.workers.semi_pd.sm_partition import Split
from kvrelay.workers.semi_pd.split_rule import SplitRuleConfig
from kvrelay.workers.semi_pd.worker import SemiPDWorker
from kvrelay.workers.types import TokenEvent, events_from_bytes, events_to_bytes
from kvrelay.workers.worker import Worker

log = logging.getLogger(__name__)


def worker_engine_config(cfg: ServeConfig, role: str | None = None) -> EngineConfig:
    """The engine settings a served worker of ``role`` gets from ``cfg``."""
    return EngineConfig(
        block_size=cfg.block_size,
        num_blocks=cfg.num_blocks_by_role.get(role) if role is not None else None,
        kv_cache_gb=cfg.kv_cache_gb,
        cpu_kv_gb=cfg.cpu_kv_gb,
        policy=cfg.policy,
        ttft_slo_s=cfg.ttft_slo_s,
        preemption_mode=cfg.preemption_mode,
        overlap_schedule=cfg.overlap_schedule,
        capture_graphs=cfg.capture_graphs,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        # prefill graphs for every step the chunk budget allows (captured at start with
        # capture_graphs), as the semi-PD prefill lane has: a longer step would run eagerly and
        # pay its shapes' first compiles mid-run (benchmarks/README.md, eleventh session)
        prefill_graph_tokens=max(MAX_TOKENS, cfg.max_num_batched_tokens),
        enable_prefix_caching=cfg.enable_prefix_caching,
        sparse=SparseConfig(
            cfg.sparse_attention,
            cfg.sparse_budget,
            shortlist_steps=cfg.sparse_shortlist_steps,
            heads_path=cfg.sparse_heads,
        ),
    )


def freeze_heap() -> None:
    """Move everything this process has built so far (modules, model, tokenizer, Ray's and
    grpc's state: 250-460k objects in each process of a served cluster) out of the collector's
    reach. A full collection walks every tracked object: 150-330 ms in the controller, driver
    or client on the 2-core box during an N = 128 rep of serve_path_bench, each a stall of the
    whole token stream; after this one walks only what was built since. Called once a process
    has started: what it built is kept for its lifetime anyway."""
    gc.collect()
    gc.freeze()


class _ControllerSink:
    """Picklable event sink: one actor call per delivery of a worker's events (one step, or
    consecutive steps when the worker's sender thread fell behind), numbered from 0 so that the
    controller applies them in order (an async actor may run one caller's calls out of order:
    cluster/controller/event_order.py). Numbering and submitting happen under one lock, since
    a semi-PD worker's two lanes share the sink. The events go as plain rows pickled by the C
    pickler (``events_to_bytes``, ``on_events_pickled``): Ray's cloudpickle calls its Python
    ``reducer_override`` per event, ~3x the cost on the worker's sender thread, which shares
    the GIL with the engine.

    ``in_flight``: at most this many calls unanswered (None: no bound). Before a new call the
    sink waits until the call ``in_flight`` back was answered; the steps that come meanwhile
    queue in the worker's outbox (workers/engine/outbox.py) and go out as one call. A
    controller that falls behind then gets fewer, larger calls, where it got one call a step
    at full price (Ray's share of a call, ~0.5 ms of the controller's CPU here, does not grow
    with its events). With 2 the controller always has the next call queued while it runs
    one, so no call waits that it could have started. A wait lasts at most ``wait_s`` (then
    the call goes anyway): a hung controller never holds the worker longer. Only for a sink
    called on a sender thread (every worker's: workers/engine/outbox.py)."""

    def __init__(self, controller: Any, in_flight: int | None = None, wait_s: float = 1.0) -> None:
        self.controller = controller
        self.in_flight = in_flight
        self.wait_s = wait_s
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._unanswered: collections.deque[concurrent.futures.Future[Any]] = collections.deque()

    def __getstate__(self) -> dict[str, Any]:
        # a fresh count, lock and record of calls where it is unpickled
        return {"controller": self.controller, "in_flight": self.in_flight, "wait_s": self.wait_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __call__(self, worker_id: str, events: list[TokenEvent]) -> None:
        with self._lock:
            if self.in_flight is not None:
                self._pace(self.in_flight)
            blob = events_to_bytes(events)
            ref = self.controller.on_events_pickled.remote(
                worker_id, blob, next(self._seq), time.time()
            )
            if self.in_flight is not None:
                self._unanswered.append(ref.future())

    def _pace(self, in_flight: int) -> None:
        """Wait until fewer than ``in_flight`` calls are unanswered (each wait <= wait_s)."""
        calls = self._unanswered
        while calls and calls[0].done():
            calls.popleft()
        while len(calls) >= in_flight:
            concurrent.futures.wait([calls[0]], timeout=self.wait_s)
            calls.popleft()  # answered (or failed: the controller is gone), or waited long enough


class _ControllerNotice:
    """Picklable preemption-notice sink (a worker's SIGTERM handler calls it)."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def __call__(self, worker_id: str, deadline_s: float) -> None:
        self.controller.notify_preemption.remote(worker_id, deadline_s)


class NoticeWorker(Worker):
    """A worker that also polls its instance's metadata endpoint for a spot notice (the
    endpoint is node-local, so the poll runs where the worker runs)."""

    def __init__(
        self,
        *args: Any,
        metadata: MetadataPollerConfig | None = None,
        device: str = "auto",
        dtype: str = "auto",
        **kw: Any,
    ):
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU share placement gave this actor: cuda:0
        has_gpu = bool(ray.get_gpu_ids())
        device, torch_dtype = resolve_device_dtype(device, dtype, has_gpu=has_gpu)
        super().__init__(*args, device=device, dtype=torch_dtype, **kw)
        self._poller_thread: threading.Thread | None = None
        if metadata is not None:
            self._poller_thread = threading.Thread(
                target=self._poll, args=(metadata,), name="metadata-poller", daemon=True
            )
            self._poller_thread.start()
        freeze_heap()  # the model and engine are up

    def _poll(self, config: MetadataPollerConfig) -> None:
        def sink(notice: PreemptionNotice) -> None:
            if self._notice is not None:
                self._notice(self.worker_id, notice.deadline_s)

        asyncio.run(MetadataPoller(config, sink).run())


class SemiPDNoticeWorker(NoticeWorker, SemiPDWorker):
    """A semi-PD worker (workers/semi_pd/) that also polls for spot notices."""


WorkerActor = ray.remote(NoticeWorker)
SemiPDWorkerActor = ray.remote(SemiPDNoticeWorker)


@ray.remote
class ControllerActor(Controller):
    def __init__(self, cfg: ServeConfig) -> None:
        config, tokenizer, model_id = load_tokenizer(cfg.model)
        if tokenizer.byte_pieces is None:  # built now (~0.2 s), not on the first request
            log.info("the tokenizer's decoder is not byte-level: detokenizing by windows")
        info = ModelInfo(model_id, config.max_context, config.vocab_size, config.eos_token_ids)
        routing = RoutingConfig(
            router=cfg.router,
            conditional_disagg=cfg.conditional_disagg,
            prefix_pull=cfg.prefix_pull,
            block_size=cfg.block_size,
            chunk_tokens=cfg.max_num_batched_tokens,
            weights=cfg.router_weights,
        )
        autosize = (
            AutosizeConfig(
                ttft_slo_s=cfg.ttft_slo_s,
                itl_slo_s=cfg.itl_slo_s,
                interval_s=cfg.autosize_interval_s,
                window_s=cfg.autosize_window_s,
            )
            if cfg.auto_pool_sizing
            else None
        )
        super().__init__(
            ControllerConfig(
                info, routing, handoff_timeout_s=cfg.handoff_timeout_s,
                transfer_slack_s=cfg.transfer_slack_s,
                itl_slo_s=cfg.itl_slo_s, autosize=autosize,
                pool_sizes=(("prefill", cfg.prefill_workers), ("decode", cfg.decode_workers),
                            ("colocated", cfg.colocated_workers)),
                admission_wait_s=cfg.admission_wait_s,
            ),
            tokenizer,
        )
        self.cfg = cfg
        self.handles: dict[str, Any] = {}
        local_gpus = ray.cluster_resources().get("GPU", 0.0) if cfg.address is None else 0.0
        policy_kw: dict[str, Any] = {
            "cpus_per_worker": cfg.cpus_per_worker, "interface": cfg.transport_interface,
            "device": cfg.device,
            "gpus_per_worker": gpu_share(local_gpus, cfg.num_workers, cfg.gpus_per_worker),
        }
        self.pools = NodePools(
            PlacementPolicy.from_prefix(cfg.placement_resource_prefix, **policy_kw)
            if cfg.placement_resource_prefix
            else PlacementPolicy(role_resources={}, **policy_kw)
        )
        self._node_task: asyncio.Task[None] | None = None
        self._store: Any = None
        self._store_addr: tuple[str, int] | None = None
        self._starting: dict[str, str] = {}  # worker id -> role, while add_worker runs
        self.supervision = Supervision(
            {"prefill": cfg.prefill_workers, "decode": cfg.decode_workers,
             "colocated": cfg.colocated_workers},
            keep_total_only=cfg.auto_pool_sizing,
        )
        self._supervising = False

    async def start_services(self) -> dict[str, Any]:
        await self.start()
        from kvrelay.workers.transport.kv_transport import start_rendezvous_store

        host = local_node_ip(self.cfg.transport_host) or self.cfg.host
        check_transport_host(host, await self.pools.refresh())
        self._store, port = start_rendezvous_store(host, 0)
        if self.cfg.watch_nodes:
            self._node_task = asyncio.create_task(self._watch_nodes())
        self._store_addr = (host, port)
        out: dict[str, Any] = {"model_id": self.config.model.id, "store_port": port}
        if self.cfg.k8s_watch:
            self._start_k8s_watch()
        return out

    async def add_worker(
        self, role: str, worker_id: str | None = None, placement: Placement | None = None
    ) -> str:
        """Start a worker of ``role`` (on the node placement picks, or the one given) and
        register it; usable while the cluster serves (replacement capacity, node joins)."""
        worker_id = worker_id or f"{role[0]}-{uuid.uuid4().hex[:6]}"
        self._starting[worker_id] = role
        try:
            return await self._add_worker(role, worker_id, placement)
        finally:
            del self._starting[worker_id]

    async def _add_worker(
        self, role: str, worker_id: str, placement: Placement | None
    ) -> str:
        cfg = self.cfg
        if placement is None:
            placement = await self.pools.place(role, worker_id)
        else:
            self.pools.record(worker_id, placement)
        me = ray.get_runtime_context().current_actor
        engine_config = worker_engine_config(cfg, role)
        options: dict[str, Any] = {
            "name": f"kvrelay-worker-{worker_id}", "max_concurrency": 32,
            **placement.actor_options(),
        }
        metadata = None
        if cfg.metadata_url:
            metadata = MetadataPollerConfig(
                url=cfg.metadata_url, target=worker_id, parser=cfg.metadata_parser,  # type: ignore[arg-type]
                interval_s=cfg.metadata_interval_s, grace_s=cfg.preemption_grace_s,
            )
        semi_pd: dict[str, Any] = {}
        actor: Any = WorkerActor
        if cfg.semi_pd and role == "colocated":
            actor = SemiPDWorkerActor
            semi_pd["split"] = Split(cfg.semi_pd_prefill_sm, cfg.semi_pd_decode_sm)
            semi_pd["window_s"] = cfg.semi_pd_window_s
            semi_pd["prefill_tokens"] = cfg.semi_pd_prefill_tokens
            semi_pd["decode_first"] = cfg.semi_pd_decode_first
            semi_pd["decode_overlap"] = cfg.semi_pd_decode_overlap
            semi_pd["prefill_overlap"] = cfg.semi_pd_prefill_overlap
            semi_pd["first_token"] = cfg.semi_pd_first_token
            semi_pd["decode_lock_first"] = cfg.semi_pd_decode_lock_first
            if cfg.semi_pd_adaptive:
                semi_pd["split_rule"] = SplitRuleConfig(cfg.ttft_slo_s, cfg.itl_slo_s)
        handle = actor.options(**options).remote(  # type: ignore[attr-defined]
            worker_id,
            role,
            model=cfg.model,
            engine_config=engine_config,
            # every worker calls its sink on a sender thread (a semi-PD worker's is shared by
            # both lanes), where waiting for the controller holds up no step
            sink=_ControllerSink(me, in_flight=2),
            notice=_ControllerNotice(me),
            grace_s=cfg.preemption_grace_s,
            metadata=metadata,
            rendezvous=self._store_addr,
            transport_bind=cfg.transport_bind,
            threads=cfg.threads_per_worker or placement.threads,
            device=cfg.device,
            dtype=cfg.dtype,
            decode_seqs=cfg.decode_seqs,
            **semi_pd,
        )
        self.handles[worker_id] = handle
        try:
            await self.register(RayWorkerClient(worker_id, handle))
        except BaseException:
            self.pools.forget(worker_id)
            raise
        return worker_id

    # ---- supervision (cluster/supervisor.py) --------------------------------------------
    async def supervise(self, interval_s: float = 0.5) -> None:
        """Keep the pools at their configured sizes from now on (called once the initial
        workers are up, so their own start is not mistaken for a shortfall)."""
        if not self._supervising:
            self._supervising = True
            self._spawn(self._supervise_loop(interval_s))
            freeze_heap()  # the cluster is up (Cluster.start calls this once its workers are)

    async def _supervise_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            live = collections.Counter(w.role for w in self.state.workers.values())
            starting = collections.Counter(self._starting.values())
            # a worker that died still holds its placement slot: give it back first
            for placed in self.pools.placed():
                if placed.worker_id not in self.state.workers and placed.worker_id not in self._starting:
                    self.pools.forget(placed.worker_id)
            now = time.monotonic()
            for role in self.supervision.due(now, live, starting):
                self.supervision.started(role, now)
                log.warning("pool %s is below its size (%d live, %d starting): starting a "
                            "replacement", role, live[role], starting[role])
                self._spawn(self._replace(role))

    async def _replace(self, role: str) -> None:
        try:
            worker_id = await self.add_worker(role)
        except Exception:
            log.exception("replacement %s worker failed to start; retrying after %.1f s",
                          role, self.supervision.backoff_s(role, time.monotonic()))
            return
        log.warning("replacement worker %s (%s) registered", worker_id, role)

    async def alive(self) -> bool:
        """The driver's liveness probe (``kvrelay serve`` exits when this stops answering)."""
        return True

    async def in_flight(self) -> int:
        return sum(not f.done for f in self.state.flights.values())

    async def _watch_nodes(self) -> None:
        """Nodes joining get workers of the pools they are pinned to; a node that leaves
        takes its workers with it (their requests resume elsewhere)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                change = await self.pools.poll()
            except Exception:
                log.exception("node poll failed")
                continue
            for wid in change.failed:
                await self.worker_failed(wid, "its node left the Ray cluster")
            for p in change.start:
                self._spawn(self.add_worker(p.role, placement=p))

    async def kill_worker(self, worker_id: str) -> None:
        """Kill a worker's process without notice (fault injection, operators)."""
        self.pools.forget(worker_id)
        handle = self.handles.get(worker_id)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def _start_k8s_watch(self) -> None:
        from kubernetes import config as k8s_config

        from kvrelay.cluster.spot.k8s_watcher import K8sWatchConfig, K8sWatcher

        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()
        queue: asyncio.Queue[PreemptionNotice] = asyncio.Queue()
        self._watcher = K8sWatcher(
            K8sWatchConfig(pod_namespace=self.cfg.k8s_namespace,
                           default_grace_s=self.cfg.preemption_grace_s),
            queue_sink(asyncio.get_running_loop(), queue),
        )
        self._watcher.start()
        self._spawn(self._consume_notices(queue))

    async def _consume_notices(self, queue: asyncio.Queue[PreemptionNotice]) -> None:
        while True:
            await self.on_notice(await queue.get())

    async def worker_pid(self, worker_id: str) -> int:
        return int(self.state.workers[worker_id].info.pid)

    async def inject_fault(self, worker_id: str, fault: str) -> None:
        await self.state.workers[worker_id].client.call("inject_fault", fault)

    async def on_events_pickled(
        self, worker_id: str, blob: bytes, seq: int, sent_at: float | None = None
    ) -> None:
        """``on_events`` for a worker's sink (``_ControllerSink``), its events pickled there;
        ``sent_at``: the sink's ``time.time()`` when it made the call (``delivery_times``)."""
        if sent_at is not None:
            took = max(0.0, time.time() - sent_at)
            self.delivery.add("from_worker", took)
            self.metrics.observe_delivery("worker_to_controller", (took,))
        await self.on_events(worker_id, events_from_bytes(blob), seq)

    # ---- metrics: the registry lives here, the frontends (in the driver) feed and serve it ----
    async def observe_requests_finished(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        """A frontend process's ended requests since its last call (``RemoteBackend``):
        (model, outcome, figures) each, as ``observe_request_finished`` takes them."""
        for model, outcome, figures in batch:
            self.metrics.observe_request_finished(model, outcome, **figures)

    async def observe_delivery(self, hop: str, seconds: list[float]) -> None:
        """A frontend process's times of its hops since its last report (``RemoteBackend``)."""
        self.metrics.observe_delivery(hop, seconds)

    async def render_metrics(self) -> bytes:
        return await asyncio.to_thread(self.metrics.render)  # ~1 ms per worker: off the loop

    async def shutdown(self) -> None:
        if self._node_task is not None:
            self._node_task.cancel()
        await self.stop()
        for handle in self.handles.values():
            ray.kill(handle, no_restart=True)
