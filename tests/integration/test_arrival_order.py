"""A request keeps the arrival its frontend stamped (``GenerateRequest.arrival_s``) on whichever
worker runs it: the controller's submit and a handoff's accept carry it to real workers (the
tiny model, CPU, in-process; a Ray call would carry the same keyword), the worker puts it on
its own monotonic clock, and the scheduler's order follows it. So a request re-dispatched after
its worker died, or moved by a handoff or a migration, is not queued behind everything that
arrived after it, and the deadline policy counts the time it waited before this worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvrelay.cluster.api.backend import GenerateRequest, ModelInfo
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.controller import Controller
from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.state import WorkerEntry
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.sequence import MAX_ARRIVAL_AGE_S, arrival_from_wall
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.transport.kv_transport import start_rendezvous_store
from kvrelay.workers.types import SamplingParams, TokenEvent
from kvrelay.workers.worker import Worker
from kvrelay_testing.local_client import LocalClient

pytestmark = pytest.mark.timeout(300)
CONFIG = EngineConfig(num_blocks=64, cpu_num_blocks=0, max_num_seqs=1, max_num_batched_tokens=64)
AGE_S = 30.0  # how long before "now" the re-dispatched request first arrived


class FirstTokens:
    """The event sink: the order in which requests got their first token, and which ended."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.ended: set[str] = set()
        self.tokens: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def __call__(self, worker_id: str, events: list[TokenEvent]) -> None:
        with self._lock:
            for e in events:
                if e.token_ids and e.request_id not in self.order:
                    self.order.append(e.request_id)
                self.tokens.setdefault(e.request_id, []).extend(e.token_ids)
                if e.finish_reason is not None:
                    self.ended.add(e.request_id)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir))


@pytest.fixture()
def sink() -> FirstTokens:
    return FirstTokens()


@pytest.fixture()
def worker(loaded: LoadedModel, sink: FirstTokens) -> Iterator[Worker]:
    w = Worker("w", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
    yield w
    w.shutdown()


def until(cond: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def prompt(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_arrival_from_wall_clamps_a_bad_clock() -> None:
    assert arrival_from_wall(1000.0, now_wall=1010.0, now=50.0) == 40.0
    assert arrival_from_wall(0.0, now_wall=1010.0, now=50.0) == 50.0  # unknown: now
    assert arrival_from_wall(2000.0, now_wall=1010.0, now=50.0) == 50.0  # a clock ahead: now
    old = arrival_from_wall(1.0, now_wall=1e9, now=1e6)
    assert old == 1e6 - MAX_ARRIVAL_AGE_S  # a day at most


def test_a_redispatched_request_keeps_its_place_ahead_of_later_arrivals(
    loaded: LoadedModel, worker: Worker, sink: FirstTokens
) -> None:
    """One sequence at a time; while a long request runs, a fresh request is submitted, then,
    through the controller's own ``submit``, one that first arrived ``AGE_S`` earlier (say
    its worker died). When the slot frees, the earlier arrival runs first, though it came to
    this worker last; without the stamp it would wait behind the fresh one."""
    controller = Controller(ControllerConfig(ModelInfo("m", 1 << 16, 512)), tokenizer=None)  # type: ignore[arg-type]
    entry = WorkerEntry(
        LocalClient(worker), worker.info(), "colocated", heartbeat=worker.heartbeat()
    )
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def flight(rid: str, text: str, arrival_s: float, params: SamplingParams) -> Flight:
        req = GenerateRequest(rid, "m", tuple(prompt(loaded, text)), params, arrival_s=arrival_s)
        return Flight(req, text=None)  # type: ignore[arg-type]

    async def submit(f: Flight) -> None:
        await controller.submit(f, entry, prefill_only=False)

    long = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    asyncio.run(submit(flight("blocker", "Tell me a story.", time.time(), long)))
    until(lambda: "blocker" in sink.order)
    asyncio.run(submit(flight("fresh", "What is a cat?", time.time(), short)))
    asyncio.run(submit(flight("earlier", "What is a dog?", time.time() - AGE_S, short)))
    waiting = worker.loop.call(lambda e: [s.request_id for s in e.scheduler.waiting])
    assert sorted(waiting) == ["earlier", "fresh"]  # both queued behind the one slot
    assert "blocker" not in sink.ended
    ages = worker.loop.call(
        lambda e: {r: time.monotonic() - e.seqs[r].arrival_time for r in ("fresh", "earlier")}
    )
    assert ages["fresh"] < 5.0 and AGE_S <= ages["earlier"] < AGE_S + 5.0
    assert worker.abort("blocker")
    until(lambda: {"fresh", "earlier"} <= sink.ended)
    assert sink.order == ["blocker", "earlier", "fresh"]
    worker.check_integrity()


def test_a_handed_off_request_keeps_its_arrival_on_the_decode_worker(
    loaded: LoadedModel, sink: FirstTokens
) -> None:
    """PD: the prefill worker parks the request, its KV goes over gloo into the decode worker's
    reservation, and ``accept_prefilled`` with the frontend's stamp continues it there: the
    decode worker's sequence is as old as the request, not as its handoff."""
    store, port = start_rendezvous_store("127.0.0.1", 0)
    config = CONFIG
    p = Worker("p", "prefill", model=loaded, engine_config=config, sink=sink,
               rendezvous=("127.0.0.1", port))  # fmt: skip
    d = Worker("d", "decode", model=loaded, engine_config=config, sink=sink,
               rendezvous=("127.0.0.1", port))  # fmt: skip
    try:
        ids = prompt(loaded, "What is a bird?")
        params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
        arrival_s = time.time() - AGE_S
        p.submit("r", ids, params, prefill_only=True, arrival_s=arrival_s)
        until(lambda: p.loop.call(lambda e: "r" in e.handoffs))
        n = p.handoff_size("r")
        assert d.reserve("r", n, time.time() + 60) is not None
        sender = threading.Thread(target=lambda: p.send_kv("r", "d", "t1", 60))
        sender.start()
        d.recv_kv("r", "p", "t1", 60)
        sender.join(60)
        d.accept_prefilled("r", ids, sink.tokens["r"], params, arrival_s=arrival_s)
        p.finish_handoff("r")
        age = d.loop.call(lambda e: time.monotonic() - e.seqs["r"].arrival_time)
        assert AGE_S <= age < AGE_S + 30.0
        assert d.abort("r")
        until(lambda: d.loop.call(lambda e: "r" not in e.seqs))
        p.check_integrity()
        d.check_integrity()
    finally:
        p.shutdown()
        d.shutdown()
        del store
