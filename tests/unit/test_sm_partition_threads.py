"""GreenContextPartition's streams, with a stand-in for torch's GreenContext: each lane computes
on a stream of its own (also at equal shares), entered on the lane's thread, and a torch whose
green contexts have no ``Stream()`` falls back to the recording partition instead of pushing
contexts whose default streams torch's allocator would take for one. Pure logic: no GPU here."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvrelay.workers.semi_pd.sm_partition import (
    CpuPartition,
    GreenContextPartition,
    Lane,
    Split,
    build_partition,
)

_current = threading.local()  # per thread, as torch's current stream


class FakeStream:
    def __init__(self, ctx: FakeGreenContext | None) -> None:
        self.ctx = ctx
        self.waited_on: list[FakeStream] = []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_on.append(other)


DEFAULT = FakeStream(None)


class FakeGreenContext:
    made: list[FakeGreenContext] = []

    def __init__(self, num_sms: int) -> None:
        self.num_sms = num_sms
        self.current = False

    @classmethod
    def create(cls, *, num_sms: int, device_id: int) -> FakeGreenContext:
        cls.made.append(cls(num_sms))
        return cls.made[-1]

    def set_context(self) -> None:
        self.current = True

    def pop_context(self) -> None:
        self.current = False

    def Stream(self) -> FakeStream:
        assert self.current, "made with its context current"
        return FakeStream(self)


class NoStreamGreenContext(FakeGreenContext):  # torch 2.10: set / pop only
    Stream = None  # type: ignore[assignment]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import torch.cuda.green_contexts as gc

    FakeGreenContext.made = []
    monkeypatch.setattr(gc, "GreenContext", FakeGreenContext)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=132)
    )
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda i=None: getattr(_current, "s", DEFAULT)
    )
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(_current, "s", s))
    yield


def on_thread(fn: Any) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(10)
    assert out, "thread failed"
    return out[0]


def test_each_lane_and_share_has_its_own_green_stream(fake_cuda: None) -> None:
    part = GreenContextPartition(0, [50, 100], Split(100, 100))
    assert sorted(c.num_sms for c in FakeGreenContext.made) == [66, 66, 132, 132]
    streams = {part.stream(lane, s) for lane in Lane for s in (50, 100)}
    assert len(streams) == 4  # equal shares too: one allocator stream per lane
    assert all(not c.current for c in FakeGreenContext.made)  # nothing left pushed


def test_entering_sets_the_lane_threads_stream(fake_cuda: None) -> None:
    part = GreenContextPartition(0, [50, 100], Split(100, 100))

    def lane(which: Lane) -> list[FakeStream]:
        seen = []
        for share in (100, 50, 100):
            part.enter(which, share)
            seen.append(torch.cuda.current_stream(0))
        return seen

    p, d = on_thread(lambda: lane(Lane.PREFILL)), on_thread(lambda: lane(Lane.DECODE))
    assert p == [part.stream(Lane.PREFILL, s) for s in (100, 50, 100)]
    assert d == [part.stream(Lane.DECODE, s) for s in (100, 50, 100)]
    assert not set(p) & set(d)
    # each switch orders the new stream after what the lane queued on the old one
    assert part.stream(Lane.DECODE, 50).waited_on == [part.stream(Lane.DECODE, 100)]
    assert part.share(Lane.DECODE) == 100
    with pytest.raises(ValueError, match="no green context for a 30% share"):
        part.enter(Lane.DECODE, 30)


def test_a_torch_without_green_streams_gets_the_recording_partition(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.cuda.green_contexts as gc

    monkeypatch.setattr(gc, "GreenContext", NoStreamGreenContext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    part = build_partition(torch.device("cuda", 0), Split(100, 100), 10)
    assert isinstance(part, CpuPartition) and not part.enforced
