"""Starts the public frontends (gRPC, OpenAI HTTP, /metrics) for a backend from a ServeConfig.

Runs on the caller's event loop: the controller actor's, so the frontends call the controller
without a hop.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.cluster.api.backend import ClusterBackend
from kvrelay.cluster.api.http_guard import HttpLimits
from kvrelay.cluster.api.limits import FrontendLimits
from kvrelay.cluster.api.servers import FrontendHandle, TlsConfig, serve_frontends
from kvrelay.cluster.metrics.recorder import Metrics
from kvrelay.cluster.runtime.config import ServeConfig


@dataclass(slots=True)
class Frontends:
    handle: FrontendHandle

    def ports(self) -> dict[str, int]:
        return {"grpc_port": self.handle.grpc_port, "http_port": self.handle.http_port}

    async def stop(self) -> None:
        await self.handle.stop()


async def start_frontends_for(
    backend: ClusterBackend, cfg: ServeConfig, metrics: Metrics | None = None
) -> Frontends:
    """``metrics`` is mounted at /metrics on the HTTP port and told about every request."""
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
        limits=FrontendLimits(max_streams=cfg.max_concurrent_streams, max_queue=cfg.max_queue_depth),
        metrics_handler=metrics.aiohttp_handler if metrics is not None else None,
        http_limits=HttpLimits(
            header_timeout_s=cfg.http_header_timeout_s,
            body_timeout_s=cfg.http_body_timeout_s,
            max_connections=cfg.http_max_connections,
        ),
        request_observer=metrics,
    )
    return Frontends(handle)
