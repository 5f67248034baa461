"""Start both frontends (gRPC and OpenAI HTTP) on the running event loop.

handle = await serve_frontends(backend, grpc_port=50051, http_port=8000)
...  # handle.grpc_port, handle.http_port are the bound ports (0 picks a free one)
await handle.stop()
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health

from kvrelay.cluster.api.auth import ApiKeys
from kvrelay.cluster.api.backend import ClusterBackend
from kvrelay.cluster.api.core import FrontendCore, RequestObserver
from kvrelay.cluster.api.grpc_server import start_grpc_server
from kvrelay.cluster.api.health import ReadinessTracker
from kvrelay.cluster.api.http_guard import HttpLimits
from kvrelay.cluster.api.http_server import HttpServer, MetricsHook, start_http_server
from kvrelay.cluster.api.limits import FrontendLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str  # PEM certificate chain
    key_file: str  # PEM private key


@dataclass(slots=True)
class FrontendHandle:
    grpc_port: int
    http_port: int
    core: FrontendCore
    _grpc: grpc.aio.Server
    _health: health.aio.HealthServicer
    _http: HttpServer
    readiness: ReadinessTracker
    _watch: asyncio.Task[None]
    _stopped: bool = False

    def stop_admitting(self) -> None:
        """Graceful shutdown, first step: readiness goes NOT_SERVING, new requests get
        UNAVAILABLE; requests in flight go on."""
        self.readiness.draining = True
        self.core.stop_admitting()

    async def stop(self, grace_s: float = 1.0) -> None:
        """Refuse new calls, give in-flight ones ``grace_s``, then cancel them (their requests
        are freed through the normal close path)."""
        if self._stopped:
            return
        self._stopped = True
        self._watch.cancel()
        await self._health.enter_graceful_shutdown()
        await asyncio.gather(self._grpc.stop(grace_s), self._http.cleanup())


def _read_tls(tls: TlsConfig) -> tuple[bytes, bytes]:
    return Path(tls.cert_file).read_bytes(), Path(tls.key_file).read_bytes()


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


async def serve_frontends(
    backend: ClusterBackend,
    *,
    grpc_port: int = 50051,
    http_port: int = 8000,
    host: str = "127.0.0.1",
    api_keys: Iterable[str] = (),
    admin_keys: Iterable[str] = (),
    tls: TlsConfig | None = None,
    limits: FrontendLimits | None = None,
    metrics_handler: MetricsHook | None = None,
    request_observer: RequestObserver | None = None,
    http_limits: HttpLimits | None = None,
) -> FrontendHandle:
    """``metrics_handler`` is mounted at GET /metrics (an aiohttp handler, or a callable that
    returns the exposition bytes); ``request_observer`` (e.g. cluster.metrics.Metrics) is told
    about every request when it ends."""
    keys = ApiKeys.from_strings(api_keys, admin_keys)
    core = FrontendCore(backend, keys, limits or FrontendLimits(), request_observer)
    creds: grpc.ServerCredentials | None = None
    ssl_ctx: ssl.SSLContext | None = None
    if tls is not None:  # file reads off the loop
        cert, key = await asyncio.to_thread(_read_tls, tls)
        creds = grpc.ssl_server_credentials([(key, cert)])
        ssl_ctx = await asyncio.to_thread(_ssl_context, tls)
    server, gport, health_servicer = await start_grpc_server(
        core, host=host, port=grpc_port, credentials=creds
    )
    tracker = ReadinessTracker(backend, health_servicer)
    await tracker.update()  # the first answer is the true one, not a default SERVING
    try:
        runner, hport = await start_http_server(
            core, host=host, port=http_port, ssl_context=ssl_ctx, metrics=metrics_handler,
            ready=tracker, limits=http_limits,
        )
    except BaseException:
        await server.stop(None)
        raise
    watch = asyncio.create_task(tracker.run())
    return FrontendHandle(gport, hport, core, server, health_servicer, runner, tracker, watch)


__all__ = [
    "FrontendHandle",
    "FrontendLimits",
    "TlsConfig",
    "serve_frontends",
]
