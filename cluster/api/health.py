"""Health the way orchestrators read it, for both frontends.

* liveness  - HTTP ``GET /health``: the process and its event loop answer.
* readiness - HTTP ``GET /ready`` (200 / 503 with the reason) and gRPC health ``SERVING`` /
  ``NOT_SERVING`` for "" and ``kvrelay.v1.Generation``: the backend's ``readiness()``, i.e. every
  configured pool has a healthy worker that is not draining. ``kvrelay.v1.Admin`` stays SERVING:
  operators need it most when nothing else works.

``track_readiness`` mirrors the backend's answer into the gRPC health servicer every
``interval_s`` (and once at once, before the server is handed out).
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from kvrelay.cluster.api.backend import ClusterBackend

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READY_SERVICES = ("", "kvrelay.v1.Generation")


class ReadinessTracker:
    def __init__(self, backend: ClusterBackend, servicer: health.aio.HealthServicer,
                 interval_s: float = 0.2) -> None:
        self.backend = backend
        self.servicer = servicer
        self.interval_s = interval_s
        self._last: bool | None = None
        self.draining = False  # set on shutdown: never ready again

    async def update(self) -> bool:
        ready = not self.draining and self.backend.readiness().ready
        if ready != self._last:
            self._last = ready
            for service in READY_SERVICES:
                await self.servicer.set(service, SERVING if ready else NOT_SERVING)
            log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")
        return ready

    async def run(self) -> None:
        while True:
            try:
                await self.update()
            except Exception:  # a readiness probe never takes the frontend down
                log.exception("readiness update failed")
            await asyncio.sleep(self.interval_s)
