"""``RemoteBackend.generate`` sends ``stop_request`` (a Ray call that aborts the request) only for
a request the controller has not ended: a stream its client left, not one whose frontend closes
it at the last event (``RequestStream.events`` returns there without asking for more)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kvrelay.cluster.api.auth import ApiKeys
from kvrelay.cluster.api.backend import GenerateRequest, ModelInfo
from kvrelay.cluster.api.core import FrontendCore, RequestStream
from kvrelay.cluster.api.limits import FrontendLimits
from kvrelay.cluster.runtime.remote_backend import RemoteBackend
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent


class _Method:
    def __init__(self, controller: _Controller, name: str) -> None:
        self.controller, self.name = controller, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.controller.calls.append(self.name)
        self.controller.called.set()
        answer = asyncio.get_running_loop().create_future()  # awaited or not (fire and forget)
        answer.set_result(None)
        return answer


class _Controller:
    """A controller actor handle that answers every call with None and records its name."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.called = asyncio.Event()  # set at every call

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def _stream(controller: _Controller) -> tuple[RemoteBackend, RequestStream]:
    backend = RemoteBackend(controller, [ModelInfo("m", 1 << 16, 512)], tokenizer=None)  # type: ignore[arg-type]
    backend._read_events = lambda: None  # type: ignore[method-assign]  # the test feeds the inbox
    core = FrontendCore(backend, ApiKeys(), FrontendLimits())
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    request = GenerateRequest("r0", "m", (1, 2, 3), params)
    return backend, RequestStream(core, request, time.monotonic(), 0)


async def _until_started(controller: _Controller) -> None:
    while "start_request" not in controller.calls:
        controller.called.clear()
        await controller.called.wait()


def test_a_request_read_to_its_end_sends_no_stop() -> None:
    async def run() -> list[TokenEvent]:
        controller = _Controller()
        backend, stream = _stream(controller)
        got: list[TokenEvent] = []

        async def consume() -> None:
            try:
                async for ev in stream.events():
                    got.append(ev)
            finally:
                await stream.close()

        task = asyncio.create_task(consume())
        await _until_started(controller)
        backend._inboxes["r0"].put([TokenEvent("r0", (5,), "a")])
        backend._inboxes["r0"].put([TokenEvent("r0", (6,), "b", FinishReason.LENGTH)])
        await task
        assert controller.calls == ["start_request"]
        assert backend.open_streams == 0
        return got

    got = asyncio.run(run())
    # both events of the wake-up as one, the finish last
    assert [(e.token_ids, e.finish_reason) for e in got] == [((5, 6), FinishReason.LENGTH)]


def test_a_stream_its_client_left_is_stopped_once() -> None:
    async def run() -> None:
        controller = _Controller()
        backend, stream = _stream(controller)
        events = stream.events()
        first = asyncio.ensure_future(events.__anext__())
        await _until_started(controller)
        backend._inboxes["r0"].put([TokenEvent("r0", (5,), "a")])
        assert (await first).token_ids == (5,)
        await events.aclose()  # the client went away mid-stream
        await stream.close()
        assert controller.calls == ["start_request", "stop_request"]
        assert backend.open_streams == 0

    asyncio.run(run())
