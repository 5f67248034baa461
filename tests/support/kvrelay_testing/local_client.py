"""The controller's ``WorkerClient`` over an in-process worker, for tests that drive the
controller's own code against real workers without Ray."""

from __future__ import annotations

import asyncio
from typing import Any

from kvrelay.workers.worker import Worker


class LocalClient:
    """Each call runs the worker's method off the event loop, as a Ray call would."""

    def __init__(self, worker: Worker) -> None:
        self.worker_id = worker.worker_id
        self.worker = worker

    async def call(self, method: str, *args: Any, timeout: float | None = None, **kw: Any) -> Any:
        return await asyncio.to_thread(getattr(self.worker, method), *args, **kw)

    def kill(self) -> None:
        self.worker.shutdown()
