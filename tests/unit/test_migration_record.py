"""A migration record accounts for every planned action (cluster/spot/executor.py): a move whose
request ended, or whose source or target failed, between the plan and its turn still gets an
outcome, so that "all outcomes in" means the notice's handling is over."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from kvrelay.cluster.controller.state import ControllerState
from kvrelay.cluster.metrics.recorder import Metrics
from kvrelay.cluster.spot.executor import MigrationRecord, PreemptionExecutor
from kvrelay.cluster.spot.planner_model import MigrateKV, Recompute


def test_moves_that_cannot_run_still_get_an_outcome() -> None:
    state = ControllerState()
    state.workers["src"] = SimpleNamespace(client=None)  # type: ignore[assignment]
    state.flights["done"] = SimpleNamespace(done=True)  # type: ignore[assignment]
    state.flights["live"] = SimpleNamespace(done=False)  # type: ignore[assignment]
    nothing: Any = None
    executor = PreemptionExecutor(state, nothing, Metrics(models=["m"]), nothing, nothing)
    record = MigrationRecord({"src": 0.0}, 0.0)
    actions = [
        MigrateKV("done", "src", "dst", 1, 0.0),  # ended since the snapshot
        MigrateKV("gone", "src", "dst", 1, 0.0),  # its flight is no longer known
        Recompute("live", "src", "dst", 8, 0.0),  # its target failed since
    ]

    async def main() -> None:
        for a in actions:
            await executor._execute(a, {"src": 0.0}, record)

    asyncio.run(main())
    assert record.outcomes == {
        "done": "finished_before_move",
        "gone": "finished_before_move",
        "live": "not_moved: dst gone",
    }
