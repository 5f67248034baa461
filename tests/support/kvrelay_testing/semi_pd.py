"""What the semi-PD worker tests share (tests/integration/semi_pd/): the questions and
engine config they run, an event sink that collects tokens, a way to hold a lane at an
iteration boundary, the colocated worker's reference tokens, and the integrity check every
test ends with."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.semi_pd.lanes import StorageLock
from kvrelay.workers.semi_pd.worker import SemiPDWorker
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent
from kvrelay.workers.worker import Worker

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in three sentences, using simple words and an example.",
    "List five prime numbers.",
    "Describe how a bicycle works, covering the frame, the chain, the gears and the brakes.",
    "Translate 'good morning' into Spanish.",
]
CONFIG = EngineConfig(max_num_batched_tokens=48, num_blocks=256, cpu_num_blocks=64)


class Collector:
    """The workers' event sink: tokens and finish reason per request."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}
        self._lock = threading.Lock()

    def __call__(self, worker_id: str, events: list[TokenEvent]) -> None:
        with self._lock:
            for e in events:
                self.tokens.setdefault(e.request_id, []).extend(e.token_ids)
                if e.finish_reason is not None:
                    self.finish[e.request_id] = e.finish_reason

    def wait(self, cond: Callable[[], bool], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.02)

    def wait_done(self, rids: list[str], timeout: float = 240.0) -> None:
        self.wait(lambda: all(r in self.finish for r in rids), timeout)


@contextmanager
def paused(loop: EngineLoop, storage_lock: StorageLock) -> Iterator[None]:
    """Hold ``loop`` at an iteration boundary, the storage lock given back meanwhile."""
    entered, go = threading.Event(), threading.Event()

    def hold(_: Engine) -> None:
        storage_lock.release()
        entered.set()
        go.wait(120)
        storage_lock.acquire()

    loop.submit(hold)
    assert entered.wait(120)
    try:
        yield
    finally:
        go.set()


def mixed_params(n: int) -> list[SamplingParams]:
    """Greedy for even requests, seeded top-k/top-p sampling for odd ones."""
    return [
        SamplingParams(max_tokens=24, temperature=0.0)
        if i % 2 == 0
        else SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=100 + i)
        for i in range(n)
    ]


def generate(
    worker: Worker,
    sink: Collector,
    prompts: list[list[int]],
    params: list[SamplingParams],
    tag: str,
) -> list[list[int]]:
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(rids, prompts, params, strict=True):
        worker.submit(rid, p, sp)
    sink.wait_done(rids)
    return [sink.tokens[r] for r in rids]


def colocated_tokens(
    loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    """The reference: a colocated worker's tokens for the batch (CONFIG), from a fresh worker."""
    sink = Collector()
    ref = Worker("ref", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
    try:
        return generate(ref, sink, prompts, params, "ref")
    finally:
        ref.shutdown()


Reference = Callable[[list[list[int]], list[SamplingParams]], list[list[int]]]


@contextmanager
def colocated_reference(loaded: LoadedModel) -> Iterator[Reference]:
    """The colocated worker's tokens for a batch (CONFIG), from one worker while this is open
    (a module fixture's), each batch generated once."""
    sink = Collector()
    worker = Worker("ref", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
    memo: dict[str, list[list[int]]] = {}

    def tokens(prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        key = repr((prompts, params))
        if key not in memo:
            worker.clear_prefix_cache()  # every batch computed from scratch
            memo[key] = generate(worker, sink, prompts, params, f"ref{len(memo)}")
        return memo[key]

    try:
        yield tokens
    finally:
        worker.shutdown()


def submit_all(
    worker: Worker, rids: list[str], prompts: list[list[int]], params: list[SamplingParams]
) -> None:
    for rid, p, sp in zip(rids, prompts, params, strict=True):
        worker.submit(rid, p, sp)


def assert_clean(worker: Worker) -> dict[str, int]:
    """No request left, no block referenced: nothing leaked, nothing owned twice. Each lane
    reads its step in flight first: an overlapped lane holds the blocks a request released
    (an abort's) until the step that may still use them is read, which its loop does on its
    next iteration; settling makes that happen now rather than racing it."""
    for loop in (getattr(worker, "prefill_loop", None), worker.loop):
        if loop is not None:
            loop.call(lambda e: None, settle=True)
    figures = worker.check_integrity()
    assert figures["requests"] == 0 and figures["used"] == 0, figures
    assert figures.get("held", 0) == 0, figures  # the decode lane gave back what it held
    assert figures.get("cpu_used", 0) == 0 and figures["reservations"] == 0, figures
    return figures


def decode_lane_held(worker: SemiPDWorker) -> int:
    """Blocks the decode lane ever held back (its own counter: the worker's heartbeat adds the
    prefill lane's, which an overlapped prefill lane holds too)."""
    return int(worker.loop.call(lambda e: e.stats().extra["overlap_held_blocks"]))
