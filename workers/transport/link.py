"""The control link of a same-GPU channel: one loopback TCP connection between its two ends.

Opened once per channel through the store (rank 0 listens on 127.0.0.1 and publishes its port
and a one-time token; rank 1 connects and presents the token), then every header, ack and
verdict of the channel travels on it, so a transfer costs one message each way on the sender's
path and no store round trip. Peers on one GPU share a host; the link assumes they also share
its loopback (one network namespace, as Ray workers of one node do).

Frame: kind (1 byte), seq (8), body length (4), body. Per transfer::

    sender (its send lock held)                  receiver
    publish: HEADER seq, header    ──────────▶  reader thread: map the memory, hand it on
                                                the copy finished (synchronised):
    reader thread: is seq awaited? ◀──────────  ACK seq      ("we stopped reading it")
      yes: CONFIRM seq, wake the   ──────────▶  CONFIRM seq  (the copy counts)
      sender: it returns

The sender's deadline and the receiver's ack agree on one outcome: at its deadline the sender
stops awaiting its seq under the same lock the reader takes on an ACK, so either the ACK came
first (CONFIRM sent, the transfer counts) or the seq is no longer awaited (no CONFIRM ever; the
sender fails and breaks the channel). The receiver counts its copy only on the CONFIRM, so it
never keeps bytes the sender may already have reused. A dead peer closes the socket (EOF):
every waiter on either side fails at once.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from kvrelay.workers.transport.wire import TransferError


class Kind(IntEnum):
    HEADER = 1  # a transfer's header (JSON)
    ACK = 2  # the receiver stopped reading the sender's memory for seq
    CONFIRM = 3  # the sender counts seq's copy
    BROKEN = 4  # the sender of this frame broke the channel (body: why)


_FRAME = struct.Struct("!BQI")  # kind, seq, body length
_TOKEN_BYTES = 32  # hex characters of the connect token


class Frame(NamedTuple):
    kind: Kind
    seq: int
    body: bytes


class Link:
    """One end of a channel's control connection. ``recv`` belongs to the channel's reader
    thread; ``publish`` to its sender (one at a time: the channel's send lock); ``ack`` to any
    thread. Every method is safe after :meth:`close` (it fails instead of blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._wlock = threading.Lock()  # one frame at a time on the socket
        self._fdlock = threading.Lock()  # shutdown vs close of the descriptor
        self._cv = threading.Condition()  # guards the fields below
        self._awaited: int | None = None  # our published seq whose ACK may still count
        self._acked = False  # the awaited seq's ACK came (and was confirmed)
        self._verdicts: dict[int, bool] = {}  # our acks waiting for the peer's CONFIRM
        self.down: str | None = None  # why the link is closed

    # ---- sender ----------------------------------------------------------------------------
    def publish(self, seq: int, header: bytes, deadline: float) -> bool:
        """Send a header and wait for its ACK: True once acked (the reader confirmed it), False
        when the deadline passed first (a later ACK gets no CONFIRM). TransferError when the
        link went down."""
        with self._cv:
            self._awaited, self._acked = seq, False
        self.send(Kind.HEADER, seq, header)
        with self._cv:
            while not self._acked and self.down is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            self._awaited = None
            if self._acked:
                return True
            if self.down is not None:
                raise TransferError(f"channel link down: {self.down}")
            return False

    # ---- receiver --------------------------------------------------------------------------
    def ack(self, seq: int, wait_until: float | None) -> bool:
        """Tell the sender we stopped reading its memory for ``seq``. With ``wait_until``: wait
        for its CONFIRM and return whether the copy counts (False: it gave up first, the link
        went down, or no answer by then). Without: only send (the CONFIRM then comes out of
        :meth:`recv`); True when sent."""
        if wait_until is None:
            return self._try_send(Kind.ACK, seq)
        with self._cv:
            self._verdicts[seq] = False
        try:
            if not self._try_send(Kind.ACK, seq):
                return False
            with self._cv:
                while not self._verdicts[seq] and self.down is None:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                return self._verdicts[seq]
        finally:
            with self._cv:
                del self._verdicts[seq]

    # ---- reader thread ---------------------------------------------------------------------
    def recv(self) -> Frame:
        """The next HEADER, BROKEN, or CONFIRM of an ack sent without waiting. ACKs and awaited
        CONFIRMs are answered here. TransferError once the link is down (EOF: the peer closed
        it or died)."""
        while True:
            kind, seq, n = _FRAME.unpack(self._read(_FRAME.size))
            body = self._read(n) if n else b""
            if kind == Kind.ACK:
                with self._cv:
                    if seq == self._awaited and not self._acked:
                        self._acked = self._try_send(Kind.CONFIRM, seq)
                        self._cv.notify_all()
                continue
            if kind == Kind.CONFIRM:
                with self._cv:
                    if seq in self._verdicts:
                        self._verdicts[seq] = True
                        self._cv.notify_all()
                        continue
            return Frame(Kind(kind), seq, body)

    # ---- both ------------------------------------------------------------------------------
    def send(self, kind: Kind, seq: int, body: bytes = b"") -> None:
        """One frame; OSError when the socket is gone."""
        frame = _FRAME.pack(kind, seq, len(body)) + body
        with self._wlock:
            self._sock.sendall(frame)

    def close(self, reason: str) -> None:
        """Take the link down (idempotent): waiters fail, the reader and the peer see EOF. The
        descriptor itself is released by :meth:`release` (the reader thread, when it ends)."""
        with self._cv:
            if self.down is None:
                self.down = reason
            self._cv.notify_all()
        with self._fdlock:  # not the write lock: this also wakes a writer blocked in sendall
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already shut down or closed
                pass

    def release(self) -> None:
        """Close the descriptor (after :meth:`close`; only the reader thread, once done)."""
        with self._wlock, self._fdlock:  # no frame mid-write; later sends fail on the closed socket
            self._rfile.close()
            self._sock.close()

    def _read(self, n: int) -> bytes:
        try:
            data = self._rfile.read(n)
        except OSError as exc:  # reset by a dying peer, or closed here
            raise self._lost(f"the channel's link failed: {exc}") from exc
        if len(data) < n:
            raise self._lost("the peer closed the channel")
        return data

    def _try_send(self, kind: Kind, seq: int) -> bool:
        try:
            self.send(kind, seq)
            return True
        except OSError:
            return False

    def _lost(self, reason: str) -> TransferError:
        self.close(reason)
        return TransferError(reason)


def accept_link(publish: Callable[[str], None], deadline: float) -> Link:
    """Rank 0's end: listen on loopback, ``publish`` ``"<port> <token>"`` (to the store) and
    accept the peer that presents the token (any other connection is dropped). OSError or
    TransferError when it did not connect by ``deadline``."""
    token = secrets.token_hex(_TOKEN_BYTES // 2).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        publish(f"{listener.getsockname()[1]} {token.decode()}")
        while True:
            listener.settimeout(_remaining(deadline))
            sock, _ = listener.accept()
            try:
                sock.settimeout(_remaining(deadline))
                got = b""
                while len(got) < _TOKEN_BYTES and (chunk := sock.recv(_TOKEN_BYTES - len(got))):
                    got += chunk
                if got == token:
                    return Link(sock)
            except OSError:
                pass
            sock.close()  # not our peer (or it went away): keep waiting for the real one


def connect_link(address: bytes, deadline: float) -> Link:
    """Rank 1's end: connect to what rank 0 published and present its token."""
    port, token = address.decode().split()
    sock = socket.create_connection(("127.0.0.1", int(port)), _remaining(deadline))
    try:
        sock.sendall(token.encode())
        return Link(sock)
    except BaseException:
        sock.close()
        raise


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferError("deadline passed while connecting the channel")
    return remaining
