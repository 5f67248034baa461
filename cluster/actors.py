"""Ray wrappers: the controller as an async actor hosting the frontends, workers as threaded
actors (a blocking KV transfer in one method must not stop heartbeats or aborts)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import ray

from kvrelay.cluster.backend import ModelInfo
from kvrelay.cluster.controller import Controller, ControllerConfig
from kvrelay.cluster.serve import ServeConfig
from kvrelay.cluster.worker_client import RayWorkerClient
from kvrelay.workers.engine import EngineConfig
from kvrelay.workers.source import load_tokenizer
from kvrelay.workers.types import TokenEvent
from kvrelay.workers.worker import Worker

log = logging.getLogger(__name__)


class _ControllerSink:
    """Picklable event sink: one actor call per worker step."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def __call__(self, worker_id: str, events: list[TokenEvent]) -> None:
        self.controller.on_events.remote(worker_id, events)


WorkerActor = ray.remote(Worker)


@ray.remote
class ControllerActor(Controller):
    def __init__(self, cfg: ServeConfig) -> None:
        config, tokenizer, model_id = load_tokenizer(cfg.model)
        info = ModelInfo(model_id, config.max_context, config.vocab_size, config.eos_token_ids)
        super().__init__(
            ControllerConfig(info, handoff_timeout_s=cfg.handoff_timeout_s), tokenizer
        )
        self.cfg = cfg
        self.handles: dict[str, Any] = {}
        self._store: Any = None
        self._store_addr: tuple[str, int] | None = None
        self._frontends: Any = None
        self._metrics_server: Any = None

    async def start_services(self) -> dict[str, Any]:
        await self.start()
        from kvrelay.workers.transport import start_rendezvous_store

        host = self.cfg.transport_host or self.cfg.host
        self._store, port = start_rendezvous_store(host, 0)
        self._store_addr = (host, port)
        out: dict[str, Any] = {"model_id": self.config.model.id, "store_port": port}
        if self.cfg.grpc_port is not None or self.cfg.http_port is not None:
            from kvrelay.cluster.frontends import start_frontends_for

            self._frontends = await start_frontends_for(self, self.cfg, self.metrics)
            out.update(self._frontends.ports())
        if self.cfg.metrics_port is not None:
            self._metrics_server = await self.metrics.serve_metrics(
                self.cfg.metrics_port, self.cfg.host
            )
            out["metrics_port"] = self._metrics_server.port
        return out

    async def add_worker(self, role: str, worker_id: str | None = None) -> str:
        cfg = self.cfg
        worker_id = worker_id or f"{role[0]}-{uuid.uuid4().hex[:6]}"
        me = ray.get_runtime_context().current_actor
        engine_config = EngineConfig(
            block_size=cfg.block_size,
            num_blocks=cfg.num_blocks_by_role.get(role),
            kv_cache_gb=cfg.kv_cache_gb,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching,
        )
        handle = WorkerActor.options(  # type: ignore[attr-defined]
            name=f"kvrelay-worker-{worker_id}", num_cpus=1, max_concurrency=32
        ).remote(
            worker_id,
            role,
            model=cfg.model,
            engine_config=engine_config,
            sink=_ControllerSink(me),
            rendezvous=self._store_addr,
            threads=cfg.threads_per_worker,
        )
        self.handles[worker_id] = handle
        await self.register(RayWorkerClient(worker_id, handle))
        return worker_id

    async def kill_worker(self, worker_id: str) -> None:
        """Kill a worker's process without notice (fault injection, operators)."""
        handle = self.handles.get(worker_id)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    async def inject_fault(self, worker_id: str, fault: str) -> None:
        await self.workers[worker_id].client.call("inject_fault", fault)

    async def shutdown(self) -> None:
        if self._frontends is not None:
            await self._frontends.stop()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        await self.stop()
        for handle in self.handles.values():
            ray.kill(handle, no_restart=True)
