"""The preemption executor's snapshot from real workers (in-process engines, no Ray): pool
sizes and request lengths come from the engines, and the planner skips a survivor whose pool
cannot hold a request to its end (prompt + max_tokens) instead of cutting it short there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.state import ControllerState, WorkerEntry
from kvrelay.cluster.metrics.recorder import Metrics
from kvrelay.cluster.routing.adapter import Routing, RoutingConfig
from kvrelay.cluster.spot.executor import PreemptionExecutor
from kvrelay.cluster.spot.planner import plan_migration
from kvrelay.cluster.spot.planner_model import MigrateKV, Recompute
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.types import Phase, SamplingParams
from kvrelay.workers.worker import Worker
from kvrelay_testing.local_client import LocalClient

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 400


def test_snapshot_carries_pool_room_and_planner_skips_a_short_pool(
    wait: Callable[..., None],
) -> None:
    torch.manual_seed(0)
    loaded = load_model(None)

    def make(wid: str, blocks: int) -> Worker:
        cfg = EngineConfig(num_blocks=blocks, cpu_num_blocks=0, max_num_batched_tokens=64)
        return Worker(wid, "decode", model=loaded, engine_config=cfg)

    # src and big keep 1024 tokens; small keeps 8 blocks x 16 = 128, idle and all free
    workers = {w.worker_id: w for w in (make("src", 64), make("small", 8), make("big", 64))}
    try:
        prompt = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me a long story about the sea."}]
        )
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        src = workers["src"]
        src.submit("r", prompt, params)
        wait(lambda: any(r.phase is Phase.DECODE for r in src.requests_info()), timeout=120)

        state = ControllerState()
        for wid, w in workers.items():
            entry = WorkerEntry(LocalClient(w), w.info(), "decode", heartbeat=w.heartbeat())
            state.workers[wid] = entry
        text: Any = SimpleNamespace()  # no token reaches the flight here
        flight = Flight(GenerateRequest("r", "m", tuple(prompt), params), text)
        flight.owner, flight.phase = "src", Phase.DECODE
        state.flights["r"] = flight
        unused: Any = None  # dispatch and KV moves: no action here reaches them
        executor = PreemptionExecutor(
            state, Routing(RoutingConfig(), "m"), Metrics(), unused, unused
        )
        leaving = {"src": time.time() + 0.6}  # too soon to finish 400 tokens in place

        snap = asyncio.run(executor._snapshot(leaving))
        by_id = {w.worker_id: w for w in snap.workers}
        for wid, w in workers.items():
            assert by_id[wid].max_seq_tokens == w.engine.max_seq_tokens
            assert by_id[wid].block_bytes == w.engine.block_bytes
            if wid != "src":  # a leaving worker offers no free blocks
                assert by_id[wid].total_blocks == w.engine.pool.num_blocks
        assert (by_id["small"].max_seq_tokens, by_id["big"].max_seq_tokens) == (128, 1024)
        (r,) = snap.requests
        assert r.prompt_tokens + r.tokens_done + r.tokens_left == len(prompt) + MAX_TOKENS
        action = plan_migration(snap).action_for("r")
        assert isinstance(action, MigrateKV | Recompute) and action.target == "big", action

        # without big, nothing that survives holds the request to its end: unplaceable
        state.workers["big"].healthy = False
        record = asyncio.run(executor.handle(leaving))
        assert record.unplaceable["r"].startswith(
            f"too_large: needs {len(prompt) + MAX_TOKENS} tokens"
        ), record.unplaceable
        assert record.actions == {}
        assert src.abort("r")
        for w in workers.values():
            wait(lambda w=w: w.check_integrity()["used"] == 0)
            assert w.check_integrity()["requests"] == 0
    finally:
        for w in workers.values():
            w.shutdown()
