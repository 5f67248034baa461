"""``kvrelay serve``: start (or join) a Ray cluster, the controller and the worker pools.

``Cluster`` is also the Python API tests and the demo use: ``Cluster.start(cfg)``, then
``generate(request)`` streams a request's events, ``kill_worker`` injects faults,
``integrity()`` reports every pool's figures.

The frontends (gRPC, OpenAI HTTP, /metrics) run in this process, the Ray driver, on a thread of
their own (frontends.py), not in the controller actor: a controller that dies leaves them up
long enough to tell every client so.

Ray's token authentication (on by default since Ray 2.60) is turned off for the local cluster
this command starts itself: every listener of it binds 127.0.0.1 (cluster/local_ray.py), so
nothing outside the machine can reach it. When joining an existing cluster (``--address``), the caller's ``RAY_AUTH_MODE`` and
token are used as they are.
"""

from __future__ import annotations

import gc
import importlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent

if TYPE_CHECKING:
    from kvrelay.cluster.runtime.frontends import DriverFrontends


class Cluster:
    """A running cluster seen from the driver process."""

    def __init__(
        self,
        cfg: ServeConfig,
        controller: Any,
        ports: dict[str, Any],
        owns_ray: bool,
        frontends: DriverFrontends | None = None,
    ):
        self.cfg = cfg
        self.controller = controller
        self.ports = ports
        self._owns_ray = owns_ray
        self.frontends = frontends

    @classmethod
    def start(cls, cfg: ServeConfig) -> Cluster:
        import ray

        # importing the actor classes imports torch, the frontends grpc and aiohttp (seconds on
        # a small machine): do it while Ray's processes start, not before
        modules = ("kvrelay.cluster.runtime.actors", "kvrelay.cluster.runtime.frontends")
        imported = threading.Thread(
            target=lambda: [importlib.import_module(m) for m in modules], daemon=True
        )
        imported.start()
        owns = not ray.is_initialized()
        if owns:
            if cfg.address is None:
                from kvrelay.cluster.runtime.local_ray import init_local_ray

                init_local_ray(  # every Ray listener on 127.0.0.1 (see local_ray.py)
                    num_cpus=max(4, cfg.num_workers + 2),
                    namespace="kvrelay",
                    log_to_driver=bool(os.environ.get("KVRELAY_RAY_LOGS")),
                )
            else:
                ray.init(address=cfg.address, namespace="kvrelay")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        imported.join()
        from kvrelay.cluster.runtime.actors import ControllerActor, freeze_heap

        if cfg.address is not None:  # joining: rendezvous and workers on routable addresses
            cfg = cfg.model_copy(update={"transport_host": cfg.transport_host or "auto",
                                         "transport_bind": cfg.transport_bind or "auto"})
        # the controller (rendezvous store) runs on this node, never a worker host
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        controller = ControllerActor.options(  # type: ignore[attr-defined]
            name=f"kvrelay-controller-{uuid.uuid4().hex[:6]}", num_cpus=0,
            max_concurrency=10_000, scheduling_strategy=here,
        ).remote(cfg)
        from kvrelay.cluster.runtime.frontends import DriverFrontends

        ports = ray.get(controller.start_services.remote())
        roles = (
            ["prefill"] * cfg.prefill_workers
            + ["decode"] * cfg.decode_workers
            + ["colocated"] * cfg.colocated_workers
        )
        started = [controller.add_worker.remote(role) for role in roles]
        frontends = None  # they come up while the workers load; /ready says 503 until then
        if any(p is not None for p in (cfg.grpc_port, cfg.http_port, cfg.metrics_port)):
            frontends = DriverFrontends.start(controller, cfg)
            ports.update(frontends.ports())
        try:
            ray.get(started)
            ray.get(controller.supervise.remote())  # from now on a dead worker is replaced
        except BaseException:
            if frontends is not None:
                frontends.close()
            raise
        freeze_heap()  # the driver's frontends are up
        return cls(cfg, controller, ports, owns, frontends)

    # ---- requests ------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        import ray

        for ref in self.controller.generate_batches.remote(request):
            yield from ray.get(ref)

    def request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        tenant: str = "",
        priority: int = 0,
    ) -> GenerateRequest:
        return GenerateRequest(
            request_id or uuid.uuid4().hex,
            self.ports.get("model_id", ""),  # type: ignore[arg-type]
            tuple(prompt_ids),
            params,
            priority=priority,
            tenant=tenant,
            arrival_s=time.time(),
        )

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams, **kw: Any) -> tuple[list[int], FinishReason]:
        tokens: list[int] = []
        reason = FinishReason.ABORT
        for event in self.generate(self.request(prompt_ids, params, **kw)):
            tokens += event.token_ids
            if event.finish_reason is not None:
                reason = event.finish_reason
        return tokens, reason

    # ---- operator and test hooks ---------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(getattr(self.controller, method).remote(*args, **kwargs))

    def workers(self) -> dict[str, str]:
        return dict(self.call("worker_ids"))

    def integrity(self) -> dict[str, dict[str, int]]:
        return dict(self.call("integrity"))

    def check_state(self) -> dict[str, int]:
        """The controller's registry and request table, checked (raises when broken), and what
        its event path holds (``Controller.check_state``)."""
        return dict(self.call("check_state"))

    def counters(self) -> dict[str, Any]:
        return dict(self.call("counters"))

    def delivery_times(self, reset: bool = False) -> dict[str, Any]:
        """A token's time from each engine to this process's frontends, hop by hop
        (``Controller.delivery_times``, and this driver's ``from_controller``, ``inbox_wait``
        and ``loop_lag`` under ``driver`` when it runs frontends)."""
        out = dict(self.call("delivery_times", reset))
        if self.frontends is not None:
            out["driver"] = self.frontends.delivery_times(reset)
        return out

    def kill_worker(self, worker_id: str) -> None:
        self.call("kill_worker", worker_id)

    def inject_fault(self, worker_id: str, fault: str) -> None:
        self.call("inject_fault", worker_id, fault)

    def shutdown(self) -> None:
        import ray

        if self.frontends is not None:
            self.frontends.close()
        try:
            self.call("shutdown")
        except Exception:
            pass
        ray.kill(self.controller)
        if self._owns_ray:
            ray.shutdown()
        gc.unfreeze()  # what ``start`` froze can be collected again (at exit too)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
