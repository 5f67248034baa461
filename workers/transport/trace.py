"""Opt-in phase trace of same-GPU block transfers (issue 16: where the fixed time goes).

Off by default (``KVTransport(trace=None)`` follows ``KVRELAY_TRANSPORT_TRACE=1``, read once at
construction, as ``ipc_events`` follows its variable); while off, a transfer pays one attribute
check where a record would start (the sender's ``send_blocks``, the receiver's reader on each
frame) and a ``None`` check at each later point. While on, each side of a same-GPU
``send_blocks`` / ``recv_blocks`` keeps a :class:`TransferRecord`: ``(phase, ns)`` marks of
``time.monotonic_ns()`` (CLOCK_MONOTONIC on Linux: one clock for every process of a host, so
the sender's and the receiver's marks of one transfer lie on one time axis). The last
``keep`` records per peer and side are kept (:meth:`Tracer.records`); a transfer's two records
share ``(prefix, seq)`` (and the transfer id): :func:`join`.

Sender marks (:data:`SEND_PHASES`), each taken once the step before it finished:
``enter`` (``KVTransport.send_blocks`` called), ``locked`` (the channel's send lock taken, seq
assigned), ``exported`` (the cache's IPC export looked up, or made on first use), ``ready``
(the block ids packed as bytes, then the ready event recorded or the stream synchronised; the
checksum, when on, is in this step), ``encoded`` (header built and encoded: JSON plus the ids'
bytes), ``header_sent`` (written on the link), ``ack_read`` (the receiver's ACK for this seq
read), ``settled`` (its done event polled complete, or an empty ACK: nothing to poll),
``confirm_sent``, ``return`` (the channel's send returns; what ``KVTransport`` does after that
is outside the record).

Receiver marks (:data:`RECV_PHASES`): on the reader thread ``frame`` (the link returned the frame),
``decoded`` (header decoded, checked, block ids read and bounds-checked), ``mapped`` (the peer's
cache mapped or found, its ready event opened: the BlockSource built), ``deliver`` (handed to the
inbox); on the receiving caller ``woke`` (it has the arrival: woke in ``Inbox.take`` or found it
there), then, on CUDA, ``ids`` (source block ids uploaded), ``ready`` (waited for the sender's ready
event, or nothing to wait for), ``launched`` (the copy function returned: on ``recv_blocks`` it
uploads the destination ids and launches the copy), ``done`` (our done event recorded, or the stream
synchronised); off CUDA (tests) ``launched`` only; then ``ack_sent`` (after the checksum, when on),
``confirmed`` (the sender's CONFIRM came, or the wait for it ended), ``return``. The receiving
caller's entry into ``recv`` / ``recv_blocks`` is ``TransferRecord.entered_ns`` (before the frame
came when the caller waited for it).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

SEND_PHASES = (
    "enter",
    "locked",
    "exported",
    "ready",
    "encoded",
    "header_sent",
    "ack_read",
    "settled",
    "confirm_sent",
    "return",
)
RECV_PHASES = (
    "frame",
    "decoded",
    "mapped",
    "deliver",
    "woke",
    "ids",
    "ready",
    "launched",
    "done",
    "ack_sent",
    "confirmed",
    "return",
)
TRACE_KEEP = 256  # records kept per peer and side
ENV = "KVRELAY_TRANSPORT_TRACE"


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "0") == "1"


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """One side's marks of one transfer. ``side``: "send" or "recv"; ``marks``: (phase,
    ``time.monotonic_ns()``) in the order taken; ``entered_ns``: the receiving caller's entry
    (0 on the sender, or when unknown)."""

    side: str
    peer: str
    transfer_id: str
    prefix: str
    seq: int
    marks: tuple[tuple[str, int], ...]
    entered_ns: int = 0

    def at(self, phase: str) -> int:
        """The mark of ``phase`` (KeyError when it was not taken)."""
        for name, ns in self.marks:
            if name == phase:
                return ns
        raise KeyError(phase)

    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.marks)


class Span:
    """A record being taken: marked by the threads that run the transfer in turn (the inbox's
    lock orders the receiver's reader before its caller), recorded once by :meth:`finish`."""

    __slots__ = ("_tracer", "entered_ns", "marks", "peer", "prefix", "seq", "side", "transfer_id")

    def __init__(
        self, tracer: Tracer, side: str, peer: str, transfer_id: str, first: str, ns: int
    ) -> None:
        self._tracer = tracer
        self.side = side
        self.peer = peer
        self.transfer_id = transfer_id
        self.prefix = ""
        self.seq = -1
        self.entered_ns = 0
        self.marks: list[tuple[str, int]] = [(first, ns)]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.monotonic_ns()))

    def finish(self) -> None:
        """Mark ``return`` and keep the record (once)."""
        self.mark("return")
        self._tracer.record(
            TransferRecord(
                self.side,
                self.peer,
                self.transfer_id,
                self.prefix,
                self.seq,
                tuple(self.marks),
                self.entered_ns,
            )
        )


def mark(span: Span | None, phase: str) -> None:
    """Mark ``phase`` on ``span``, a transfer's record while tracing (None: not traced)."""
    if span is not None:
        span.mark(phase)


class Tracer:
    """A transport's trace: ``enabled`` (may be flipped at any time: it is read where a record
    would start) and the last ``keep`` records per peer and side."""

    def __init__(self, enabled: bool = False, keep: int = TRACE_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be positive: {keep}")
        self.enabled = enabled
        self.keep = keep
        self._lock = threading.Lock()
        self._rings: dict[tuple[str, str], deque[TransferRecord]] = {}

    def span(self, side: str, peer: str, transfer_id: str, first: str, ns: int = 0) -> Span:
        """Start a record (callers check ``enabled`` first) with its first mark at ``ns``
        (0: now)."""
        return Span(self, side, peer, transfer_id, first, ns or time.monotonic_ns())

    def record(self, record: TransferRecord) -> None:
        with self._lock:
            ring = self._rings.get((record.peer, record.side))
            if ring is None:
                ring = self._rings[(record.peer, record.side)] = deque(maxlen=self.keep)
            ring.append(record)

    def records(self, peer: str, side: str | None = None) -> list[TransferRecord]:
        """The kept records of transfers with ``peer`` (one side, or both: sends first),
        oldest first."""
        sides = ("send", "recv") if side is None else (side,)
        with self._lock:
            return [r for s in sides for r in self._rings.get((peer, s), ())]

    def clear(self) -> None:
        with self._lock:
            self._rings.clear()


def join(
    sent: list[TransferRecord], received: list[TransferRecord]
) -> list[tuple[TransferRecord, TransferRecord]]:
    """Pairs (sender's record, receiver's record) of the same transfer: same channel prefix
    and seq, and the same transfer id; in the senders' order."""
    by_key = {(r.prefix, r.seq): r for r in received}
    pairs = []
    for s in sent:
        r = by_key.get((s.prefix, s.seq))
        if r is not None and r.transfer_id == s.transfer_id:
            pairs.append((s, r))
    return pairs
