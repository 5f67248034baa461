"""GreenContextPartition's push / pop discipline, with a stand-in for torch's GreenContext that
enforces what CUDA does: a green context is current per thread and only the thread that pushed
it can pop it (the H200 run of tests/gpu/test_semi_pd_gpu.py failed on exactly this when a lane
entered from a second thread). Pure logic: no GPU here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from kvrelay.workers.semi_pd.sm_partition import GreenContextPartition, Lane, Split

_stacks = threading.local()  # per thread, as CUDA's current-context stack


class FakeGreenContext:
    def __init__(self, num_sms: int) -> None:
        self.num_sms = num_sms

    @classmethod
    def create(cls, num_sms: int, device_id: int) -> FakeGreenContext:
        return cls(num_sms)

    def set_context(self) -> None:
        _stacks.__dict__.setdefault("stack", []).append(self)

    def pop_context(self) -> None:
        stack = _stacks.__dict__.setdefault("stack", [])
        assert stack and stack[-1] is self, "expected popped context to be the current ctx"
        stack.pop()


@pytest.fixture
def partition(monkeypatch: pytest.MonkeyPatch) -> GreenContextPartition:
    import torch.cuda.green_contexts as gc

    monkeypatch.setattr(gc, "GreenContext", FakeGreenContext)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=132)
    )
    return GreenContextPartition(0, [25, 50, 100], Split(50, 100))


def on_thread(fn: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def test_a_lane_entering_from_a_new_thread_does_not_pop_another_threads_context(
    partition: GreenContextPartition,
) -> None:
    on_thread(lambda: partition.enter(Lane.PREFILL, 25))
    on_thread(lambda: partition.enter(Lane.PREFILL, 100))  # CPython may reuse the dead id
    assert partition.share(Lane.PREFILL) == 100


def test_switching_on_one_thread_pops_what_it_pushed(partition: GreenContextPartition) -> None:
    def run() -> None:
        for share in (25, 50, 100, 25):
            partition.enter(Lane.DECODE, share)
            assert _stacks.stack == [partition._contexts[Lane.DECODE, share]]  # one pushed at a time

    on_thread(run)
    assert partition.share(Lane.DECODE) == 25
