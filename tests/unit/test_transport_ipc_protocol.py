"""The same-GPU transfer protocol's pure parts, on CPU: the block list a header names, the ack
agreement between a sender's deadline and a receiver's copy (on a real TCPStore), and how the
inbox treats blocks it may no longer read. The CUDA side (mapping, copy) is in tests/gpu."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from kvrelay.kernels import pack_blocks
from kvrelay.workers.transport.channel import Arrival, BlockSource, Inbox, await_ack, give_ack
from kvrelay.workers.transport.kv_transport import start_rendezvous_store
from kvrelay.workers.transport.wire import Header, TransferError, block_source, checksum

BLOCK = (2, 2, 4, 1, 8)  # [L, 2, bs, Hkv, D]


def header(n: int, ipc: dict | None, seq: int = 0, tid: str = "t") -> Header:
    shape = (n, *BLOCK)
    return Header(seq, tid, torch.float32, shape, n * 2 * 2 * 4 * 8 * 4, ipc=ipc)


def blocks_ipc(ids: list, cache_shape: list | None) -> dict:
    return {"handle": "00", "blocks": ids, "cache_shape": cache_shape}


# ---- the block list ---------------------------------------------------------------------------
def test_block_list_survives_the_wire_and_is_checked_against_the_header() -> None:
    h = header(3, blocks_ipc([7, 0, 9], [10, *BLOCK]))
    assert block_source(Header.decode(h.encode().encode())) == ((10, *BLOCK), [7, 0, 9])
    assert block_source(header(3, None)) is None
    assert block_source(header(3, {"handle": "00"})) is None  # a staged payload


@pytest.mark.parametrize(
    ("ids", "cache_shape"),
    [
        ([1, 2], [10, *BLOCK]),  # 2 ids for a 3-block header
        ([1, 2, 3], [10, 2, 2, 4, 1, 4]),  # another block shape
        ([1, 2, 10], [10, *BLOCK]),  # past the sender's cache
        ([1, -1, 2], [10, *BLOCK]),
        (["x", 1, 2], [10, *BLOCK]),
        ([1, 2, 3], None),
        ([1, 2, 3], [-10, *BLOCK]),
    ],
)
def test_a_bad_block_list_is_a_transfer_error(ids: list, cache_shape: list | None) -> None:
    with pytest.raises(TransferError):
        block_source(header(3, blocks_ipc(ids, cache_shape)))


# ---- the ack agreement (real store) -----------------------------------------------------------
@pytest.fixture
def store() -> Iterator[Callable[[], dist.Store]]:
    """Makes clients of a real rendezvous store."""
    server, port = start_rendezvous_store()

    def client() -> dist.Store:
        return dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10)
        )

    yield client
    del server


def test_an_ack_given_before_or_during_the_wait_counts(store: Callable[[], dist.Store]) -> None:
    ctl, waiter, peer = store(), store(), store()
    assert give_ack(peer, "a/0")
    t0 = time.monotonic()
    await_ack(ctl, waiter, "a/0", time.monotonic() + 5)
    timer = threading.Timer(0.2, lambda: give_ack(peer, "a/1"))
    timer.start()
    await_ack(ctl, waiter, "a/1", time.monotonic() + 5)
    assert time.monotonic() - t0 < 3
    timer.join()
    # the deadline already passed, but the receiver had acked: the transfer counts
    assert give_ack(peer, "a/2")
    await_ack(ctl, waiter, "a/2", time.monotonic() - 1)


def test_a_sender_whose_deadline_passed_and_a_late_receiver_agree_it_failed(
    store: Callable[[], dist.Store],
) -> None:
    ctl, waiter, peer = store(), store(), store()
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        await_ack(ctl, waiter, "b/0", time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - t0 < 3
    assert give_ack(peer, "b/0") is False  # the receiver learns its copy does not count
    with pytest.raises(TransferError):
        await_ack(ctl, waiter, "b/1", time.monotonic() - 1)
    assert give_ack(peer, "b/1") is False


# ---- blocks the inbox may no longer read --------------------------------------------------------
class Acks:
    def __init__(self, answer: bool = True) -> None:
        self.calls = 0
        self.answer = answer

    def __call__(self) -> bool:
        self.calls += 1
        return self.answer


def source_arrival(tid: str, generation: int, acks: Acks) -> Arrival:
    cache = torch.randn((4, *BLOCK))
    src = BlockSource(cache, torch.tensor([2, 0]), generation, None, acks)
    return Arrival(header(2, blocks_ipc([2, 0], [4, *BLOCK]), tid=tid), None, source=src)


def test_blocks_whose_waiter_gave_up_are_acked_so_the_sender_is_not_held() -> None:
    inbox, acks = Inbox(), Acks()
    with pytest.raises(TransferError):
        inbox.take("late", 0, time.monotonic())
    inbox.deliver(source_arrival("late", 0, acks))
    assert acks.calls == 1 and inbox.pending() == 0


def test_a_failed_channel_drops_its_unread_blocks_but_keeps_owned_payloads() -> None:
    inbox, acks = Inbox(), Acks()
    inbox.deliver(source_arrival("mine", 0, acks))
    inbox.deliver(source_arrival("newer", 1, acks))
    inbox.deliver(Arrival(header(1, None, tid="owned"), torch.ones(1, *BLOCK)))
    inbox.fail(0, "peer lost")
    with pytest.raises(TransferError, match="peer lost"):
        inbox.take("mine", 0, time.monotonic() + 1)
    assert torch.equal(inbox.take("owned", 0, time.monotonic() + 1).payload, torch.ones(1, *BLOCK))
    assert inbox.take("newer", 1, time.monotonic() + 1).source is not None
    inbox.deliver(source_arrival("after", 0, acks))  # the failed channel's reader, late
    assert inbox.pending() == 0 and acks.calls == 0


def test_reading_blocks_acks_once_and_fails_when_the_sender_gave_up() -> None:
    acks = Acks()
    arrival = source_arrival("t", 0, acks)
    assert arrival.source is not None
    got = arrival.source.read(pack_blocks)
    assert torch.equal(got, arrival.source.cache[[2, 0]]) and acks.calls == 1
    late = Acks(answer=False)
    src = source_arrival("t", 0, late).source
    assert src is not None
    with pytest.raises(TransferError, match="gave up"):
        src.read(pack_blocks)
    assert late.calls == 1


def test_reading_blocks_acks_even_when_the_copy_fails_and_checks_the_checksum() -> None:
    acks = Acks()
    cache = torch.randn((4, *BLOCK))
    ids = torch.tensor([3, 1])

    def broken(_cache: torch.Tensor, _ids: torch.Tensor) -> None:
        raise RuntimeError("device fault")

    with pytest.raises(RuntimeError, match="device fault"):
        BlockSource(cache, ids, 0, None, acks).read(broken)
    good = checksum(cache[[3, 1]])
    assert torch.equal(BlockSource(cache, ids, 0, good, acks).read(pack_blocks), cache[[3, 1]])
    with pytest.raises(TransferError, match="checksum"):
        BlockSource(cache, ids, 0, good ^ 1, acks).read(pack_blocks)
    assert acks.calls == 3
