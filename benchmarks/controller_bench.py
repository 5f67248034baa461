"""The controller's CPU per token streamed (issue 17), measured without Ray's noise around it.

    python benchmarks/controller_bench.py --tokenizer DIR [--batches 32 128 --steps 256 --reps 5]

A real ``Controller`` (its request table, flights, detokenizer, event streams) with one fake
worker (answers ``info`` and ``submit``; the only fake part), driven as ``kvrelay serve`` drives
it: N requests started on one event stream (``start_request``, as ``RemoteBackend`` does), then
``--steps`` deliveries of N one-token events through ``on_events`` (numbered, as the worker's
sink sends them: ``events_to_bytes`` on the way in and ``events_from_bytes`` here, as
``on_events_pickled`` does), the
stream read as the driver reads it (each item pickled with Ray's cloudpickle, as Ray does to
send it). Each delivery waits until the stream has yielded its tokens, so nothing coalesces:
the cost of a controller that keeps up with its worker. Tokens are a real text's ids cycled
(the detokenizer sees words). Figure: this thread's CPU time (``time.thread_time``) over the
deliveries, less the reader's ``unpack`` (the driver's share, printed apart), / tokens
delivered; the check: the stream yielded N*steps tokens and every request finished.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from ray import cloudpickle

from kvrelay.cluster.api.backend import GenerateRequest, ModelInfo
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.controller import Controller
from kvrelay.cluster.controller.streams import unpack
from kvrelay.workers.model.source import load_tokenizer
from kvrelay.workers.types import (
    FinishReason,
    SamplingParams,
    TokenEvent,
    events_from_bytes,
    events_to_bytes,
)
from kvrelay.workers.worker import WorkerInfo

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
    "father had, and lit the lamp before the fishing boats came around the northern point. "
)


class FakeWorker:
    worker_id = "w"

    def __init__(self, progress: asyncio.Event) -> None:
        self.submitted: list[str] = []
        self.progress = progress

    async def call(self, method: str, *args: Any, timeout: float | None = None, **kw: Any) -> Any:
        if method == "info":
            return WorkerInfo("w", "colocated", "127.0.0.1", 0, "m", 16, 1 << 20, 1, 1 << 16)
        if method == "submit":
            self.submitted.append(args[0])
            self.progress.set()
        return None

    def kill(self) -> None:
        pass


async def one_run(tokenizer: Any, n: int, steps: int) -> tuple[float, float, float]:
    ctl = Controller(ControllerConfig(ModelInfo("m", 1 << 16, 49152)), tokenizer)
    progress = asyncio.Event()  # set whenever a submit or a stream item came
    worker = FakeWorker(progress)
    await ctl.register(worker)
    stream = ctl.event_stream("s")
    got = 0
    finished = 0
    unpack_s = 0.0  # the driver's share (unpickling what the stream sent): not counted

    async def until(done: Callable[[], bool]) -> None:
        while not done():
            progress.clear()
            await progress.wait()

    async def read() -> None:
        nonlocal got, finished, unpack_s
        async for packed in stream:
            cloudpickle.dumps(packed)  # what Ray does to every item it sends to the driver
            t = time.thread_time()
            items = unpack(packed)
            unpack_s += time.thread_time() - t
            for _, events in items:
                for ev in events:
                    got += len(ev.token_ids)
                    finished += ev.finish_reason is not None
            progress.set()

    reader = asyncio.create_task(read())
    rids = [f"r{i}" for i in range(n)]
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    for rid in rids:
        await ctl.start_request("s", GenerateRequest(rid, "m", (1, 2, 3, 4), params))
    await until(lambda: len(worker.submitted) == n)
    ids = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    wires = [
        events_to_bytes(
            [
                TokenEvent(rid, (ids[(s + i) % len(ids)],),
                           finish_reason=FinishReason.LENGTH if s == steps - 1 else None)
                for i, rid in enumerate(rids)
            ]
        )
        for s in range(steps)
    ]  # fmt: skip
    c0, w0 = time.thread_time(), time.perf_counter()
    for s, wire in enumerate(wires):
        await ctl.on_events("w", events_from_bytes(wire), s)
        await until(lambda want=n * (s + 1): got == want)
    c1, w1 = time.thread_time(), time.perf_counter()
    await until(lambda: finished == n)
    reader.cancel()
    tokens = n * steps
    assert got == tokens and finished == n, (got, finished)
    return 1e6 * (c1 - c0 - unpack_s) / tokens, 1e6 * (w1 - w0) / tokens, 1e6 * unpack_s / tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    _, tokenizer, _ = load_tokenizer(args.tokenizer)
    for n in args.batches:
        asyncio.run(one_run(tokenizer, n, 16))  # warm-up
        cpu, wall, unpacked = [], [], []
        for _ in range(args.reps):
            c, w, u = asyncio.run(one_run(tokenizer, n, args.steps))
            cpu.append(c)
            wall.append(w)
            unpacked.append(u)
        print(
            f"N={n}: controller CPU {statistics.median(cpu):.1f} us/token (reps "
            + ", ".join(f"{x:.1f}" for x in cpu)
            + f"), wall {statistics.median(wall):.1f} us/token, the driver's unpack "
            f"{statistics.median(unpacked):.2f} us/token; tokens {n * args.steps} per rep, all "
            "received",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
