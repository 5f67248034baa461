"""How the controller calls a worker: one async ``call`` over a Ray actor.

The controller never blocks its event loop on a worker: Ray calls are awaited object refs,
and raise ``WorkerGone`` when the worker is dead.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class WorkerGone(RuntimeError):
    """The worker's process is gone (killed, crashed, or its node left)."""


class WorkerClient(Protocol):
    worker_id: str

    async def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        ...

    def kill(self) -> None: ...


class RayWorkerClient:
    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle

    async def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        import ray

        ref = getattr(self.handle, method).remote(*args, **kwargs)
        try:
            return await asyncio.wait_for(ref, timeout) if timeout else await ref
        except ray.exceptions.RayActorError as exc:
            raise WorkerGone(f"{self.worker_id}: {exc}") from exc
        except TimeoutError:
            ray.cancel(ref)
            raise

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # already gone
            pass
