"""The opt-in phase trace of same-GPU block transfers (workers/transport/trace.py), on CPU.

Two real :class:`Channel` objects in this process, joined by a real control link (loopback Unix
sockets opened through a real store), run the same-GPU ``send_blocks`` / receive path with the
CUDA parts stood in for: the sender's cache is "exported" by reference (a dict instead of an IPC
handle), the stream and the IPC events are stubs. Everything else (the send lock, the header on
the wire, the reader thread, the inbox hand-off, ``BlockSource.read``, ACK, CONFIRM, the trace
points) is the code a GPU runs. The CUDA-only marks (``ids``, ``ready``, ``done`` on the
receiver) are taken only on a CUDA cache: tests/gpu checks them."""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvrelay.workers.transport import channel as channel_mod
from kvrelay.workers.transport import trace as trace_mod
from kvrelay.workers.transport.buffers import BufferPool
from kvrelay.workers.transport.channel import Channel
from kvrelay.workers.transport.inbox import Inbox
from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store
from kvrelay.workers.transport.link import Link, accept_link, connect_link
from kvrelay.workers.transport.trace import (
    RECV_PHASES,
    SEND_PHASES,
    Tracer,
    TransferRecord,
    join,
)

BLOCK = (2, 2, 4, 1, 8)  # [L, 2, bs, Hkv, D]
# what the CPU stand-in takes of the phases: no device ids, ready wait or done event off CUDA
CPU_RECV_PHASES = tuple(p for p in RECV_PHASES if p not in ("ids", "ready", "done"))


class _Stream:
    def synchronize(self) -> None:
        pass


class _Event:
    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _Events:  # IpcEvents' shape
    def __init__(self) -> None:
        self.ready, self.done = _Event(), _Event()
        self.ready_handle, self.done_handle = "ee" * 8, b"done-event"


@pytest.fixture
def store() -> Iterator[tuple[dist.Store, int]]:
    server, port = start_rendezvous_store()
    yield server, port
    del server


@pytest.fixture
def cpu_ipc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for CUDA IPC in this one process: exports by reference, stub stream/events."""
    exported: dict[str, torch.Tensor] = {}

    def export_ipc(flat: torch.Tensor) -> dict[str, Any]:
        handle = f"cpu-{flat.data_ptr():x}"
        exported[handle] = flat
        return {"handle": handle, "storage_offset": 0, "offset": 0}

    def import_ipc(fields: dict[str, Any], nbytes: int, device: torch.device) -> torch.Tensor:
        return exported[fields["handle"]]

    monkeypatch.setattr(channel_mod, "export_ipc", export_ipc)
    monkeypatch.setattr(channel_mod, "import_ipc", import_ipc)
    monkeypatch.setattr(channel_mod, "open_event", lambda handle, device: _Event())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())


def _links(port: int) -> tuple[Link, Link]:
    def client() -> dist.Store:
        return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(10))

    a, b = client(), client()
    deadline = time.monotonic() + 10
    got: dict[int, Link] = {}
    t = threading.Thread(
        target=lambda: got.setdefault(0, accept_link(lambda v: a.set("p/link", v), deadline))
    )
    t.start()
    b.wait(["p/link"])
    got[1] = connect_link(bytes(b.get("p/link")), deadline)
    t.join(10)
    return got[0], got[1]


Pair = tuple[Channel, Channel, Inbox]


@pytest.fixture
def channels(
    store: tuple[dist.Store, int], cpu_ipc: None
) -> Iterator[Callable[[Tracer, Tracer, bool], Pair]]:
    """``make(sender's tracer, receiver's tracer, events)``: a sender's and a receiver's
    channel of one pair (prefix "p") and the receiver's inbox."""
    made: list[Channel] = []

    def make(send_tracer: Tracer, recv_tracer: Tracer, events: bool) -> Pair:
        ends = _links(store[1])
        inboxes = [Inbox(), Inbox()]
        pair = [
            Channel(
                prefix="p",
                rank=rank,
                generation=1,
                pg=None,
                link=ends[rank],
                ctl=store[0],
                reader_store=None,
                inbox=inboxes[rank],
                device=torch.device("cpu"),
                max_message_bytes=1 << 30,
                buffers=BufferPool(0),
                on_break=lambda: None,
                events=_Events() if events else None,  # type: ignore[arg-type]
                tracer=tracer,
                peer=("recv", "send")[rank],
            )
            for rank, tracer in ((0, send_tracer), (1, recv_tracer))
        ]
        made.extend(pair)
        return pair[0], pair[1], inboxes[1]

    yield make
    for ch in made:
        ch.close("test over")
    for ch in made:
        ch.join(5)


def handoff(
    sender: Channel, inbox: Inbox, n: int, rounds: int, span: Callable[[str], Any]
) -> list[torch.Tensor]:
    """``rounds`` block transfers sender -> receiver, received on another thread (as the
    controller runs both sides); returns what the receiver copied out, per round."""
    src = torch.randn((8, *BLOCK))
    got: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            for r in range(rounds):
                arrival = inbox.take(f"t{r}", 1, time.monotonic() + 10)
                assert arrival.source is not None
                got.append(
                    arrival.source.read(lambda c, ids: c[ids].clone(), time.monotonic() + 10)
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    for r in range(rounds):
        ids = torch.tensor([(r + k) % 8 for k in range(n)])
        nbytes = sender.send_blocks(f"t{r}", src, ids, time.monotonic() + 10, False, span(f"t{r}"))
        assert nbytes == n * src[0].numel() * 4
    t.join(10)
    assert not errors, errors
    for r, copy in enumerate(got):
        assert torch.equal(copy, src[[(r + k) % 8 for k in range(n)]])
    return got


def _nondecreasing(record: TransferRecord) -> bool:
    times = [ns for _, ns in record.marks]
    return all(a <= b for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("events", [True, False], ids=["ipc-events", "host-syncs"])
def test_a_traced_transfer_has_every_phase_in_order_on_both_sides_and_they_join(
    channels: Callable[[Tracer, Tracer, bool], Pair], events: bool
) -> None:
    send_tracer, recv_tracer = Tracer(True), Tracer(True)
    sender, _, inbox = channels(send_tracer, recv_tracer, events)

    def span(tid: str) -> Any:  # what KVTransport.send_blocks starts
        return send_tracer.span("send", "recv", tid, "enter")

    handoff(sender, inbox, 3, 4, span)
    sent, received = send_tracer.records("recv"), recv_tracer.records("send")
    assert send_tracer.records("recv", "recv") == [] and recv_tracer.records("send", "send") == []
    assert [r.seq for r in sent] == [0, 1, 2, 3] == [r.seq for r in received]
    pairs = join(sent, received)
    assert [(s.transfer_id, r.transfer_id) for s, r in pairs] == [(f"t{i}",) * 2 for i in range(4)]
    for s, r in pairs:
        assert (s.side, r.side, s.prefix, r.prefix) == ("send", "recv", "p", "p")
        assert s.phases == SEND_PHASES
        assert r.phases == CPU_RECV_PHASES
        assert _nondecreasing(s) and _nondecreasing(r)
        # one time axis: each message is read after the mark taken before it was written
        assert s.at("encoded") <= r.at("frame")  # HEADER
        assert r.at("launched") <= s.at("ack_read")  # ACK
        assert s.at("settled") <= r.at("confirmed")  # CONFIRM
        assert r.at("return") - s.at("enter") < 10 * 10**9
    # the receiver's record is in the ring only once its caller returned
    assert all(r.entered_ns == 0 for r in received)  # (set by KVTransport's receive)


def test_the_trace_is_off_by_default_and_takes_no_record_path(
    channels: Callable[[Tracer, Tracer, bool], Pair],
    store: tuple[dist.Store, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(trace_mod.ENV, raising=False)
    with KVTransport("tr-a", "127.0.0.1", store[1]) as t:
        assert t.tracer.enabled is False and t.trace("tr-b") == []
    assert Tracer().enabled is False

    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError("a trace path was taken with the trace off")

    monkeypatch.setattr(trace_mod.Span, "__init__", no)
    monkeypatch.setattr(trace_mod.Span, "mark", no)
    monkeypatch.setattr(trace_mod.Tracer, "span", no)
    send_tracer, recv_tracer = Tracer(), Tracer()
    sender, _, inbox = channels(send_tracer, recv_tracer, True)
    handoff(sender, inbox, 2, 3, lambda tid: None)
    assert send_tracer.records("recv") == [] and recv_tracer.records("send") == []


def test_the_transport_takes_its_trace_setting_from_the_argument_or_the_environment(
    store: tuple[dist.Store, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(trace_mod.ENV, "1")
    with KVTransport("tr-c", "127.0.0.1", store[1]) as t:
        assert t.tracer.enabled is True
    with KVTransport("tr-d", "127.0.0.1", store[1], trace=False) as t:
        assert t.tracer.enabled is False
    monkeypatch.setenv(trace_mod.ENV, "0")
    with KVTransport("tr-e", "127.0.0.1", store[1], trace=True) as t:
        assert t.tracer.enabled is True


def test_the_ring_keeps_the_last_records_per_peer_and_side(
    channels: Callable[[Tracer, Tracer, bool], Pair],
) -> None:
    send_tracer, recv_tracer = Tracer(True, keep=3), Tracer(True, keep=2)
    sender, _, inbox = channels(send_tracer, recv_tracer, True)
    handoff(sender, inbox, 1, 6, lambda tid: send_tracer.span("send", "recv", tid, "enter"))
    assert [r.seq for r in send_tracer.records("recv")] == [3, 4, 5]
    assert [r.seq for r in recv_tracer.records("send")] == [4, 5]
    assert len(join(send_tracer.records("recv"), recv_tracer.records("send"))) == 2
    with pytest.raises(ValueError):
        Tracer(True, keep=0)


def test_a_trace_switched_off_midway_stops_recording() -> None:
    tracer = Tracer(True, keep=4)
    span = tracer.span("send", "x", "t0", "enter")
    span.mark("locked")
    span.finish()
    tracer.enabled = False
    assert [r.phases for r in tracer.records("x")] == [("enter", "locked", "return")]
    assert tracer.records("x", "recv") == []
    tracer.clear()
    assert tracer.records("x") == []
