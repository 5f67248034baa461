"""The controller's background tasks (a migration, the autosizer): nobody awaits them, so a
failure must reach the log rather than vanish with the task."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kvrelay.cluster.api.backend import ModelInfo
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.controller import Controller


def test_a_failed_background_task_is_logged_and_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("the planner's snapshot timed out")

    async def ok() -> None:
        return None

    async def main() -> Controller:
        controller = Controller(ControllerConfig(ModelInfo("m", 1 << 16, 512)), tokenizer=None)  # type: ignore[arg-type]
        controller._spawn(fails())
        controller._spawn(ok())
        await asyncio.gather(*controller._tasks, return_exceptions=True)
        assert not controller._tasks  # the done callbacks ran before gather's
        return controller

    with caplog.at_level(logging.ERROR, logger="kvrelay.cluster.controller.controller"):
        asyncio.run(main())
    failed = [r for r in caplog.records if r.name == Controller.__module__ and r.exc_info]
    assert len(failed) == 1, caplog.text
    assert "fails" in failed[0].getMessage()
    assert "the planner's snapshot timed out" in caplog.text


def test_delivery_times_skip_a_worker_that_is_gone() -> None:
    """One worker answers its sender's figures, one died since the last heartbeat: the
    controller's own figures and the live worker's still come back."""
    from kvrelay.cluster.controller.state import WorkerEntry
    from kvrelay.cluster.controller.worker_client import WorkerGone

    class Client:
        def __init__(self, gone: bool) -> None:
            self.gone = gone

        async def call(self, method: str, *args: object, timeout: float | None = None) -> object:
            assert method == "delivery_times"
            if self.gone:
                raise WorkerGone("w2: the actor died")
            return {"sink_call": {"count": 3.0}}

    async def main() -> dict[str, object]:
        controller = Controller(ControllerConfig(ModelInfo("m", 1 << 16, 512)), tokenizer=None)  # type: ignore[arg-type]
        for wid, gone in (("w1", False), ("w2", True)):
            controller.state.workers[wid] = WorkerEntry(Client(gone), None, "decode")  # type: ignore[arg-type]
        controller.delivery.add("from_worker", 0.002)
        return await controller.delivery_times()

    got = asyncio.run(main())
    assert got["workers"] == {"w1": {"sink_call": {"count": 3.0}}}
    assert got["controller"]["from_worker"]["count"] == 1  # type: ignore[index]
