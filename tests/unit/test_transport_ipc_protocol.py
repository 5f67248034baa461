"""The same-GPU transfer protocol's parts that run on CPU: the block list a header names, the
control link (header, ack, confirmation; the agreement between a sender's deadline and a
receiver's copy; a peer going away) over real loopback sockets, and how the inbox treats blocks
it may no longer read. The CUDA side (mapping, copy) is in tests/gpu."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from kvrelay.kernels import pack_blocks
from kvrelay.workers.transport.inbox import Arrival, BlockSource, Inbox
from kvrelay.workers.transport.ipc import device_ids, poll
from kvrelay.workers.transport.kv_transport import start_rendezvous_store
from kvrelay.workers.transport.link import Frame, Kind, Link, accept_link, connect_link
from kvrelay.workers.transport.wire import (
    Header,
    TransferError,
    block_ids_section,
    block_source,
    checksum,
)

BLOCK = (2, 2, 4, 1, 8)  # [L, 2, bs, Hkv, D]


def header(
    n: int, ipc: dict | None, seq: int = 0, tid: str = "t", blocks: bytes | None = None
) -> Header:
    shape = (n, *BLOCK)
    return Header(seq, tid, torch.float32, shape, n * 2 * 2 * 4 * 8 * 4, ipc=ipc, blocks=blocks)


def ids_section(ids: list[int]) -> bytes:
    return block_ids_section(torch.tensor(ids))


def blocks_header(section: bytes, cache_shape: list | None, n: int = 3, tid: str = "t") -> Header:
    """A send_blocks header of ``n`` blocks: the ids' binary section of a ``cache_shape`` cache."""
    return header(n, {"handle": "00", "cache_shape": cache_shape}, tid=tid, blocks=section)


# ---- the block list ---------------------------------------------------------------------------
def test_block_list_survives_the_wire_and_is_checked_against_the_header() -> None:
    h = blocks_header(ids_section([7, 0, 10]), [16, *BLOCK])  # id 10: a newline byte in the section
    got = Header.decode(h.encode())
    assert got == h
    source = block_source(got)
    assert source is not None
    assert source[0] == (16, *BLOCK)
    assert source[1].dtype == torch.int64 and source[1].tolist() == [7, 0, 10]
    assert block_source(header(3, None)) is None
    assert block_source(header(3, {"handle": "00"})) is None  # a staged payload
    assert b"\n" not in header(3, {"handle": "00"}).encode()  # plain JSON (the store takes text)
    # other integer dtypes and strided views go out as the same int64 bytes
    assert block_ids_section(torch.tensor([7, 9, 0, 9, 10], dtype=torch.int32)[::2]) == (
        ids_section([7, 0, 10])
    )


@pytest.mark.parametrize(
    ("section", "cache_shape"),
    [
        (ids_section([1, 2]), [10, *BLOCK]),  # 2 ids for a 3-block header
        (ids_section([1, 2, 3]), [10, 2, 2, 4, 1, 4]),  # another block shape
        (ids_section([1, 2, 10]), [10, *BLOCK]),  # past the sender's cache
        (ids_section([1, -1, 2]), [10, *BLOCK]),
        (ids_section([1, 2, 3])[:-1], [10, *BLOCK]),  # not a whole number of ids
        (ids_section([1, 2, 3]) + bytes(4), [10, *BLOCK]),
        (ids_section([1, 2, 3]), None),
        (ids_section([1, 2, 3]), [-10, *BLOCK]),
    ],
)
def test_a_bad_block_list_is_a_transfer_error(section: bytes, cache_shape: list | None) -> None:
    with pytest.raises(TransferError):
        block_source(blocks_header(section, cache_shape))
    with pytest.raises(TransferError):  # the same ids, decoded off the wire
        block_source(Header.decode(blocks_header(section, cache_shape).encode()))


def test_block_ids_without_ipc_fields_are_a_transfer_error() -> None:
    with pytest.raises(TransferError, match="malformed block list"):
        block_source(header(3, None, blocks=ids_section([1, 2, 3])))


def test_a_frame_whose_binary_section_is_cut_padded_or_undeclared_fails_to_decode() -> None:
    h = blocks_header(ids_section([7, 0, 9]), [10, *BLOCK])
    raw = h.encode()
    text = replace(h, blocks=None).encode()  # the same header declaring no section
    for bad in (
        raw[:-1],  # cut short
        raw + b"\0",  # padded
        raw[: raw.index(b"\n")],  # the section lost
        text + b"\n" + ids_section([7, 0, 9]),  # a section nobody declared
        raw[:20],  # the JSON cut
        b"\n" + raw,
    ):
        with pytest.raises(TransferError, match=r"malformed|binary section"):
            Header.decode(bad)


# ---- the control link (real loopback sockets, opened through a real store) ----------------------
@pytest.fixture
def links() -> Iterator[Callable[..., tuple[Link, Link]]]:
    """Opens the two ends of a control link through a real rendezvous store, as channels do."""
    server, port = start_rendezvous_store()
    opened: list[Link] = []

    def client() -> dist.Store:
        return dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10)
        )

    def pair(prefix: str = "p") -> tuple[Link, Link]:
        a, b = client(), client()
        key = f"{prefix}/link"
        deadline = time.monotonic() + 10
        got: dict[int, Link] = {}
        t = threading.Thread(
            target=lambda: got.setdefault(0, accept_link(lambda v: a.set(key, v), deadline))
        )
        t.start()

        b.wait([key])
        got[1] = connect_link(bytes(b.get(key)), deadline)
        t.join(10)
        opened.extend(got.values())
        return got[0], got[1]

    yield pair
    for link in opened:
        link.close("test over")
        link.release()
    del server


def _read_until_down(link: Link) -> None:
    with contextlib.suppress(TransferError):
        while True:
            link.recv()


def _started(target: Callable[..., object], *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def drain(link: Link) -> threading.Thread:
    """A reader thread: answers the peer's ACKs and CONFIRMs until the link goes down."""
    return _started(_read_until_down, link)


def serve(link: Link, answer: Callable[[int], object]) -> threading.Thread:
    """A receiver: its reader hands the next header's seq to ``answer`` on a caller thread (as a
    channel's inbox does), then keeps reading."""

    def run() -> None:
        frame = link.recv()
        assert frame.kind == Kind.HEADER
        _started(answer, frame.seq)
        _read_until_down(link)

    return _started(run)


def test_an_acked_header_counts_on_both_sides(links: Callable[..., tuple[Link, Link]]) -> None:
    sender, receiver = links()
    verdicts: list[bool] = []
    serve(receiver, lambda seq: verdicts.append(receiver.ack(seq, time.monotonic() + 5)))
    assert sender.publish(0, b"header", time.monotonic() + 5) is True
    deadline = time.monotonic() + 5
    while not verdicts and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert verdicts == [True]


def test_a_sender_whose_deadline_passed_and_a_late_receiver_agree_it_failed(
    links: Callable[..., tuple[Link, Link]],
) -> None:
    sender, receiver = links()
    t0 = time.monotonic()
    assert sender.publish(0, b"header", time.monotonic() + 0.3) is False
    assert 0.25 < time.monotonic() - t0 < 3
    frame = receiver.recv()
    assert (frame.kind, frame.seq) == (Kind.HEADER, 0)
    # the late ack gets no confirmation: the receiver's copy does not count
    assert receiver.ack(0, time.monotonic() + 0.5) is False
    # the sender breaks the channel: a receiver waiting for its word learns at once
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(receiver.ack(0, time.monotonic() + 30)))
    waiter.start()
    sender.close("gave up")
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        receiver.recv()
    waiter.join(5)
    assert done == [False] and time.monotonic() - t0 < 3


def test_a_peer_that_goes_away_fails_a_waiting_sender_at_once(
    links: Callable[..., tuple[Link, Link]],
) -> None:
    sender, receiver = links()
    reader = drain(sender)
    serve(receiver, lambda seq: receiver.close("receiver died"))
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="down"):
        sender.publish(0, b"header", time.monotonic() + 30)
    assert time.monotonic() - t0 < 3
    reader.join(3)
    assert not reader.is_alive()
    with pytest.raises(TransferError):
        sender.publish(1, b"header", time.monotonic() + 30)


def test_an_ack_sent_without_waiting_returns_its_confirmation_as_a_frame(
    links: Callable[..., tuple[Link, Link]],
) -> None:
    sender, receiver = links()
    result: list[bool] = []
    t = threading.Thread(
        target=lambda: result.append(sender.publish(7, b"h", time.monotonic() + 5))
    )
    t.start()
    frame = receiver.recv()
    assert receiver.ack(frame.seq, None) is True
    assert receiver.recv() == Frame(Kind.CONFIRM, 7, b"")
    t.join(5)
    assert result == [True]


def test_the_ack_body_reaches_the_senders_settle_and_a_failed_settle_is_never_confirmed(
    links: Callable[..., tuple[Link, Link]],
) -> None:
    """IPC events: the ACK names the receiver's done event; the sender confirms only once its
    settle (polling that event) succeeded, so a settle that ran into the deadline fails both."""
    sender, receiver = links()
    bodies: list[bytes] = []
    verdicts: dict[int, bool] = {}

    def settle(ok: bool) -> Callable[[bytes], bool]:
        return lambda body: bodies.append(body) is None and ok

    def answer(seq: int) -> None:
        verdicts[seq] = receiver.ack(seq, time.monotonic() + 5, b"done-event-%d" % seq)

    def read() -> None:
        with contextlib.suppress(TransferError):
            while True:
                _started(answer, receiver.recv().seq)

    reader = _started(read)
    assert sender.publish(0, b"h", time.monotonic() + 5, settle(True)) is True
    assert sender.publish(1, b"h", time.monotonic() + 30, settle(False)) is False
    t0 = time.monotonic()
    sender.close("gave up")  # as the channel does: it breaks
    reader.join(5)
    while len(verdicts) < 2 and time.monotonic() < t0 + 5:
        threading.Event().wait(0.01)
    assert bodies == [b"done-event-0", b"done-event-1"]
    assert verdicts == {0: True, 1: False}  # seq 1 never confirmed: its receive fails at once
    assert time.monotonic() - t0 < 3


def test_poll_returns_when_done_and_gives_up_at_the_deadline_or_when_abandoned() -> None:
    calls = [0]

    def third_time() -> bool:
        calls[0] += 1
        return calls[0] >= 3

    assert poll(third_time, time.monotonic() + 5, lambda: False) is True and calls[0] == 3
    t0 = time.monotonic()
    assert poll(lambda: False, time.monotonic() + 0.05, lambda: False) is False
    assert 0.05 <= time.monotonic() - t0 < 1  # past the spin, sleeps stay short
    t0 = time.monotonic()
    assert poll(lambda: False, time.monotonic() + 30, lambda: True) is False
    assert time.monotonic() - t0 < 1


def test_block_ids_already_on_the_device_are_not_copied() -> None:
    ids = torch.tensor([3, 1])
    assert device_ids(ids, torch.device("cpu")) is ids


def test_transfers_both_ways_at_once_each_get_their_own_ack(
    links: Callable[..., tuple[Link, Link]],
) -> None:
    ends = links()
    headers: list[list[int]] = [[], []]
    published: list[list[bool]] = [[], []]

    def reader(i: int) -> None:  # acks each header at once, as a staged receive does
        with contextlib.suppress(TransferError):
            while True:
                frame = ends[i].recv()
                if frame.kind == Kind.HEADER:
                    headers[i].append(frame.seq)
                    ends[i].ack(frame.seq, None)

    def sender(i: int) -> None:
        for seq in range(50):
            published[i].append(ends[i].publish(seq, b"h%d" % i, time.monotonic() + 10))

    threads = [
        threading.Thread(target=fn, args=(i,), daemon=True)
        for fn in (reader, sender)
        for i in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join(20)
    assert published == [[True] * 50, [True] * 50]
    assert headers == [list(range(50)), list(range(50))]


def test_a_connection_without_the_token_is_dropped_and_an_absent_peer_times_out() -> None:
    published: list[str] = []
    deadline = time.monotonic() + 10
    got: list[Link] = []
    t = threading.Thread(target=lambda: got.append(accept_link(published.append, deadline)))
    t.start()
    while not published:
        threading.Event().wait(0.01)
    name, token = published[0].split()
    with socket.socket(socket.AF_UNIX) as stranger:
        stranger.connect("\0" + name)
        stranger.sendall(b"0" * (len(token) + 1))
        assert stranger.recv(1) == b""  # dropped
    peer = connect_link(published[0].encode(), deadline)
    t.join(5)
    assert len(got) == 1
    for link in (got[0], peer):
        link.close("test over")
        link.release()
    t0 = time.monotonic()
    with pytest.raises((OSError, TransferError)):
        accept_link(lambda v: None, time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 3


# ---- blocks the inbox may no longer read --------------------------------------------------------
class Acks:
    def __init__(self, answer: bool = True) -> None:
        self.calls = 0
        self.answer = answer

    def __call__(self, wait_until: float | None) -> bool:
        self.calls += 1
        return self.answer


def source_arrival(tid: str, generation: int, acks: Acks) -> Arrival:
    cache = torch.randn((4, *BLOCK))
    src = BlockSource(cache, torch.tensor([2, 0]), generation, None, acks)
    return Arrival(blocks_header(ids_section([2, 0]), [4, *BLOCK], 2, tid), None, source=src)


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
    got = arrival.source.read(pack_blocks, time.monotonic() + 1)
    assert torch.equal(got, arrival.source.cache[[2, 0]]) and acks.calls == 1
    late = Acks(answer=False)
    src = source_arrival("t", 0, late).source
    assert src is not None
    with pytest.raises(TransferError, match="gave up"):
        src.read(pack_blocks, time.monotonic() + 1)
    assert late.calls == 1


def test_reading_blocks_acks_even_when_the_copy_fails_and_checks_the_checksum() -> None:
    acks = Acks()
    cache = torch.randn((4, *BLOCK))
    ids = torch.tensor([3, 1])

    def broken(_cache: torch.Tensor, _ids: torch.Tensor) -> None:
        raise RuntimeError("device fault")

    with pytest.raises(RuntimeError, match="device fault"):
        BlockSource(cache, ids, 0, None, acks).read(broken, time.monotonic() + 1)
    good = checksum(cache[[3, 1]])
    assert torch.equal(
        BlockSource(cache, ids, 0, good, acks).read(pack_blocks, time.monotonic() + 1),
        cache[[3, 1]],
    )
    with pytest.raises(TransferError, match="checksum"):
        BlockSource(cache, ids, 0, good ^ 1, acks).read(pack_blocks, time.monotonic() + 1)
    assert acks.calls == 3
