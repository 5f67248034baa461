"""The public frontends (gRPC, OpenAI HTTP, /metrics) of a served cluster, in the driver process.

They run on an event loop of their own, on a thread of the process that started the cluster
(``kvrelay serve``, or a test through ``Cluster.start``), and reach the controller through
``RemoteBackend`` (remote_backend.py). The controller actor can die without taking their
sockets with it: its clients get an UNAVAILABLE error (an SSE error event, a 503, a gRPC
status) instead of a cut stream, and ``kvrelay serve`` exits non-zero (serve_loop.py).

    host = DriverFrontends.start(controller, cfg)   # blocks until the ports are bound
    host.ports()                                     # grpc_port, http_port, metrics_port
    host.stop_admitting(); host.in_flight()          # graceful shutdown
    host.close(flush_s)                              # wait for streams (bounded), then stop
    host.close(flush_s, gone=why)                    # the controller is dead or hung: every
                                                     # stream first ends with UNAVAILABLE
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kvrelay.cluster.api.errors import ApiError
from kvrelay.cluster.api.http_guard import HttpLimits
from kvrelay.cluster.api.http_server import error_response
from kvrelay.cluster.api.limits import FrontendLimits
from kvrelay.cluster.api.servers import FrontendHandle, TlsConfig, serve_frontends
from kvrelay.cluster.metrics.http_server import MetricsServer, serve_handler
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.remote_backend import RemoteBackend

T = TypeVar("T")


@dataclass(slots=True)
class Frontends:
    handle: FrontendHandle | None
    metrics_server: MetricsServer | None
    watch: asyncio.Task[None]
    backend: RemoteBackend

    def ports(self) -> dict[str, int]:
        out = {}
        if self.handle is not None:
            out = {"grpc_port": self.handle.grpc_port, "http_port": self.handle.http_port}
        if self.metrics_server is not None:
            out["metrics_port"] = self.metrics_server.port
        return out

    async def stop(self) -> None:
        self.watch.cancel()
        if self.handle is not None:
            await self.handle.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        await self.backend.close()


def _metrics_handler(backend: RemoteBackend) -> Any:
    async def metrics(request: web.Request) -> web.Response:
        try:
            body = await backend.render_metrics()
        except ApiError as err:  # the controller is gone: no figures to serve
            return error_response(err)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


async def _watches(backend: RemoteBackend) -> None:
    await asyncio.gather(backend.watch(), backend.watch_loop())


async def start_frontends_for(backend: RemoteBackend, cfg: ServeConfig) -> Frontends:
    """Mount /metrics (the controller's registry) on the HTTP port and ``--metrics-port``; every
    ended request is reported to it."""
    await backend.refresh()  # the first readiness answer is the controller's, not a default
    # readiness from the controller, and the loop's own lag (delivery_times' ``loop_lag``)
    watch = asyncio.create_task(_watches(backend))
    metrics = _metrics_handler(backend)
    handle = server = None
    try:
        if cfg.grpc_port is not None or cfg.http_port is not None:
            tls = None
            if cfg.tls_cert or cfg.tls_key:
                if not (cfg.tls_cert and cfg.tls_key):
                    raise ValueError("TLS needs both --tls-cert and --tls-key")
                tls = TlsConfig(cfg.tls_cert, cfg.tls_key)
            handle = await serve_frontends(
                backend,
                grpc_port=cfg.grpc_port if cfg.grpc_port is not None else 0,
                http_port=cfg.http_port if cfg.http_port is not None else 0,
                host=cfg.host,
                api_keys=cfg.api_keys,
                admin_keys=cfg.admin_keys,
                tls=tls,
                limits=FrontendLimits(
                    max_streams=cfg.max_concurrent_streams, max_queue=cfg.max_queue_depth
                ),
                metrics_handler=metrics,
                http_limits=HttpLimits(
                    header_timeout_s=cfg.http_header_timeout_s,
                    body_timeout_s=cfg.http_body_timeout_s,
                    max_connections=cfg.http_max_connections,
                ),
                request_observer=backend,
            )
        if cfg.metrics_port is not None:
            server = await serve_handler(metrics, cfg.metrics_port, cfg.host)
    except BaseException:
        watch.cancel()
        if handle is not None:
            await handle.stop()
        raise
    return Frontends(handle, server, watch, backend)


class DriverFrontends:
    """``Frontends`` on a daemon thread's event loop; its methods are called from other threads."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvrelay-frontends", daemon=True
        )
        self._thread.start()
        self.frontends: Frontends | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @classmethod
    def start(cls, controller: Any, cfg: ServeConfig) -> DriverFrontends:
        import ray

        from kvrelay.workers.model.source import load_tokenizer

        _, tokenizer, _ = load_tokenizer(cfg.model)  # ~0.2 s; the controller loads the same
        backend = RemoteBackend(controller, ray.get(controller.models.remote()), tokenizer)
        host = cls()
        try:
            host.frontends = host._run(start_frontends_for(backend, cfg))
        except BaseException:
            host._loop.call_soon_threadsafe(host._loop.stop)
            raise
        return host

    def ports(self) -> dict[str, int]:
        return self.frontends.ports() if self.frontends is not None else {}

    def stop_admitting(self) -> None:
        """Graceful shutdown, first step: readiness NOT_SERVING, new requests UNAVAILABLE."""
        if self.frontends is not None and self.frontends.handle is not None:
            self._loop.call_soon_threadsafe(self.frontends.handle.stop_admitting)

    def streams(self) -> int:
        """Requests the frontends hold (admitted or streaming)."""
        handle = self.frontends.handle if self.frontends is not None else None
        return handle.core.in_flight if handle is not None else 0

    def backend_streams(self) -> int:
        """Requests whose events the backend still routes to a frontend (``open_streams``)."""
        return self.frontends.backend.open_streams if self.frontends is not None else 0

    def event_batches(self) -> int:
        """Ray objects the controller's event stream has brought so far (benchmarks)."""
        return self.frontends.backend.batches_received if self.frontends is not None else 0

    def backend_calls(self) -> dict[str, int]:
        """Ray calls the backend has made to the controller so far, by method (benchmarks)."""
        return dict(self.frontends.backend.calls) if self.frontends is not None else {}

    def delivery_times(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """The backend's ``from_controller``, ``inbox_wait`` and ``loop_lag``
        (``RemoteBackend.delivery``)."""
        if self.frontends is None:
            return {}
        return self.frontends.backend.delivery.summary(reset=reset)

    def close(self, flush_s: float = 0.0, gone: str | None = None) -> int:
        """Stop admitting, give the streams in flight up to ``flush_s`` to end, then stop the
        servers and the loop. ``gone``: why the controller is dead or hung; every request in
        flight is failed with UNAVAILABLE first (a hung controller would never wake them), so
        the streams end with their error events. Returns the streams still open when the
        servers stopped."""
        if gone is not None and self.frontends is not None:
            self._loop.call_soon_threadsafe(self.frontends.backend.give_up, gone)
        self.stop_admitting()
        deadline = time.monotonic() + flush_s
        while self.streams() and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.streams()
        if self.frontends is not None:
            self._run(self.frontends.stop(), timeout_s=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        return left
