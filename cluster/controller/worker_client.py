"""How the controller calls a worker: one async ``call`` over a Ray actor or an in-process one.

The controller never blocks its event loop on a worker: Ray calls are awaited object refs;
in-process workers run the call on a thread. Both raise ``WorkerGone`` when the worker is dead.
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


class LocalWorkerClient:
    """A worker object in this process (single-process serving and tests)."""

    def __init__(self, worker_id: str, worker: Any) -> None:
        self.worker_id = worker_id
        self.worker = worker
        self.dead = False

    async def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        if self.dead:
            raise WorkerGone(f"{self.worker_id} was stopped")
        fn = getattr(self.worker, method)
        coro = asyncio.to_thread(fn, *args, **kwargs)
        return await (asyncio.wait_for(coro, timeout) if timeout else coro)

    def kill(self) -> None:
        self.dead = True
        self.worker.shutdown()
