"""The controller's multiplexed event streams (cluster/controller/streams.py), over a fake
``run_request``: one stream carries several requests' events (a request's events ready together
merged into one), an error reaches only its request, ``stop`` and closing the stream abort what
is still running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.controller.streams import EventStreams, Item, Mailbox
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent


def request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, "m", (1, 2), SamplingParams(max_tokens=4))


class FakeController:
    """Requests named ``bad*`` fail; ``slow*`` wait on ``step`` before each token."""

    def __init__(self) -> None:
        self.step = asyncio.Event()
        self.aborted: list[str] = []

    async def run(self, req: GenerateRequest, emit: Callable[[list[TokenEvent]], None]) -> None:
        rid = req.request_id
        done = False
        try:
            if rid.startswith("bad"):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{rid} is bad")
            if rid.startswith("half"):  # one event, then an error
                emit([TokenEvent(rid, (7,))])
                raise ApiError(ErrorCode.UNAVAILABLE, f"{rid} lost its worker")
            for i in range(3):
                if rid.startswith("slow"):
                    await self.step.wait()
                    self.step.clear()
                last = i == 2
                emit([TokenEvent(rid, (i,), "", FinishReason.LENGTH if last else None)])
            done = True
        finally:
            if not done:
                self.aborted.append(rid)


async def read_until(items: AsyncIterator[list[Item]], want: int) -> list[list[Item]]:
    got: list[list[Item]] = []
    while sum(len(b) for b in got) < want:
        got.append(await anext(items))
    return got


def test_one_stream_carries_several_requests_and_errors_reach_their_own() -> None:
    async def main() -> None:
        fake = FakeController()
        streams = EventStreams(fake.run)
        out = streams.serve("s1")
        streams.start("s1", request("a"))
        streams.start("s1", request("b"))
        streams.start("s1", request("bad1"))
        streams.start("s1", request("half1"))
        batches = await read_until(out, 5)  # a's and b's 3 events each, half1's, 2 errors
        # all ready at once: one stream item, each request's events merged into one event
        assert len(batches) == 1
        by_rid: dict[str, list[object]] = {}
        for batch in batches:
            for rid, item in batch:
                by_rid.setdefault(rid, []).append(item)
        for rid in ("a", "b"):
            [events] = by_rid[rid]
            assert isinstance(events, list)
            [event] = events
            assert event.token_ids == (0, 1, 2)
            assert event.finish_reason is FinishReason.LENGTH
        [err] = by_rid["bad1"]
        assert isinstance(err, ApiError) and err.code is ErrorCode.INVALID_ARGUMENT
        [events, err] = by_rid["half1"]  # the error after the event that came before it
        assert isinstance(events, list) and [e.token_ids for e in events] == [(7,)]
        assert isinstance(err, ApiError) and err.code is ErrorCode.UNAVAILABLE
        assert fake.aborted == ["bad1", "half1"]
        await out.aclose()

    asyncio.run(main())


def test_stop_and_stream_close_abort_what_runs() -> None:
    async def main() -> None:
        fake = FakeController()
        streams = EventStreams(fake.run)
        out = streams.serve("s1")
        streams.start("s1", request("slow-a"))
        streams.start("s1", request("slow-b"))
        fake.step.set()
        rid = (await read_until(out, 1))[0][0][0]
        assert streams.stop(rid) is True
        assert streams.stop(rid) is False
        try:
            streams.start("s1", request("slow-b"))
            raise AssertionError("a request id in flight was started twice")
        except ValueError:
            pass
        await out.aclose()  # the frontend process went away: the other request is stopped
        for _ in range(20):
            if len(fake.aborted) == 2:
                break
            await asyncio.sleep(0)
        assert sorted(fake.aborted) == ["slow-a", "slow-b"]
        try:  # nobody reads a closed stream: starting a request on it is refused
            streams.start("s1", request("late"))
            raise AssertionError("a request started on a closed stream")
        except ApiError as err:
            assert err.code is ErrorCode.UNAVAILABLE
        assert "late" not in fake.aborted

    asyncio.run(main())


def test_mailbox_hands_over_everything_queued_at_each_wake_up() -> None:
    async def main() -> None:
        box: Mailbox[int] = Mailbox()
        box.put(1)
        box.put(2)
        assert len(box) == 2
        assert await box.take() == [1, 2]  # what was queued, in order, without waiting
        assert len(box) == 0
        reader = asyncio.create_task(box.take())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing queued: the reader waits
        box.put(3)  # wakes it; what comes before it runs goes in the same take
        box.put(4)
        assert await reader == [3, 4]
        box.put(5)  # a put after the take is the next take's
        assert await box.take() == [5]
        cancelled = asyncio.create_task(box.take())
        await asyncio.sleep(0)
        cancelled.cancel()  # a reader that gives up leaves nothing behind
        await asyncio.gather(cancelled, return_exceptions=True)
        box.put(6)
        assert await box.take() == [6]

    asyncio.run(main())
