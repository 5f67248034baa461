"""The driver's own Python per gRPC chunk (issue 17), without Ray's or grpc's cost around it.

    python benchmarks/driver_bench.py [--batches 32 128 --steps 256 --reps 5]

What ``kvrelay serve``'s driver runs for every chunk it streams, between the event stream's
reader and grpc: the reader's ``unpack`` of each stream object (a step's events, as the
controller's ``pack`` made it) into the requests' inboxes, ``RemoteBackend.generate`` taking a
request's events from its inbox and merging them, ``RequestStream.events`` counting and timing
them, and the gRPC frontend's message (``grpc_server._event``, serialized). N requests on a real
``RemoteBackend`` over a fake controller handle (``start_request`` answers at once; the event
stream's reader is not started: the benchmark unpacks each step's object and puts its events
into the inboxes as the reader does), then ``--steps`` steps of one one-token event a request;
each step waits until every stream took its event, so nothing coalesces and every token is one
chunk. Figure: this thread's CPU time (``time.thread_time``) over the steps / tokens. Check: the
streams yielded N*steps tokens and every one finished. serve_path_bench's per-process figures
put grpc's own per-message work (not measured here) at most of the driver's samples.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from kvrelay.cluster.api.auth import ApiKeys
from kvrelay.cluster.api.backend import GenerateRequest, ModelInfo
from kvrelay.cluster.api.core import FrontendCore, RequestStream
from kvrelay.cluster.api.grpc_server import _event
from kvrelay.cluster.api.limits import FrontendLimits
from kvrelay.cluster.controller.streams import pack, unpack
from kvrelay.cluster.runtime.remote_backend import RemoteBackend
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent


class _Method:
    def __init__(self, called: Callable[[], None]) -> None:
        self.called = called

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.called()

        async def done() -> None:
            return None

        return done()


class FakeController:
    """A controller actor handle whose every method answers None at once; counts the calls
    (a stream calls ``start_request`` once its inbox is in place)."""

    def __init__(self, progress: asyncio.Event) -> None:
        self.calls = 0
        self.progress = progress

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._called)

    def _called(self) -> None:
        self.calls += 1
        self.progress.set()


async def one_run(n: int, steps: int) -> tuple[float, int, int]:
    progress = asyncio.Event()  # set whenever a stream started or took an event
    controller = FakeController(progress)
    backend = RemoteBackend(controller, [ModelInfo("m", 1 << 16, 512)], tokenizer=None)  # type: ignore[arg-type]
    backend._read_events = lambda: None  # type: ignore[method-assign]  # the benchmark reads
    core = FrontendCore(backend, ApiKeys(), FrontendLimits())
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    streams = [
        RequestStream(core, GenerateRequest(f"r{i}", "m", (1, 2, 3), params), time.monotonic(), 0)
        for i in range(n)
    ]
    got = 0
    finished = 0

    async def until(done: Callable[[], bool]) -> None:
        while not done():
            progress.clear()
            await progress.wait()

    async def consume(stream: RequestStream) -> None:
        nonlocal got, finished
        try:
            async for ev in stream.events():
                _event(stream, ev).SerializeToString()
                got += len(ev.token_ids)
                finished += ev.finish_reason is not None
                progress.set()
        finally:
            await stream.close()

    tasks = [asyncio.create_task(consume(s)) for s in streams]
    await until(lambda: controller.calls == n)  # every stream waits on its inbox
    inboxes = backend._inboxes
    packed = [
        pack(
            [
                (f"r{i}", [TokenEvent(f"r{i}", (5,), "x",
                                      FinishReason.LENGTH if s == steps - 1 else None)])
                for i in range(n)
            ]
        )
        for s in range(steps)
    ]  # fmt: skip
    c0 = time.thread_time()
    for s, step in enumerate(packed):
        for rid, item in unpack(step):  # as RemoteBackend._read hands a stream object out
            inboxes[rid].put(item)
        # every stream took this step's event: nothing coalesces
        await until(lambda want=n * (s + 1): got == want)
    c1 = time.thread_time()
    await asyncio.gather(*tasks)
    assert got == n * steps and finished == n, (got, finished)
    return 1e6 * (c1 - c0) / (n * steps), got, finished


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for n in args.batches:
        asyncio.run(one_run(n, 16))  # warm-up
        cpu = [asyncio.run(one_run(n, args.steps))[0] for _ in range(args.reps)]
        print(
            f"N={n}: driver CPU {statistics.median(cpu):.1f} us/chunk of 1 token (reps "
            + ", ".join(f"{x:.1f}" for x in cpu)
            + f"); tokens {n * args.steps} per rep, all received",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
