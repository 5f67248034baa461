"""The control link of a same-GPU channel: two Unix-socket connections between its two ends.

Opened once per channel through the store: rank 0 listens on an abstract Unix socket (Linux; no
file, nothing on any network interface) and publishes its name and a one-time token; rank 1
connects twice and presents the token. Each connection belongs to one *sending* side: it
carries that side's HEADER, CONFIRM and BROKEN frames one way and the peer's ACKs back, so a
sender reads its ACK itself (no thread hand-off on its path) and each side's reader thread reads
one socket. Per transfer::

    sender (its send lock held)                   receiver
    HEADER seq, header  ── own connection ──▶    reader thread: map the memory, hand it on
    read the ACK itself  ◀──────────────────     ACK seq [body] (we stopped reading, or: our
    settle(body): wait until the copy is done           copy is queued, body names the event
    CONFIRM seq, return  ──────────────────▶           that completes after it; ipc.py)
                                                 reader: CONFIRM seq (the copy counts)

so the sender's path is one message each way, plus the CONFIRM it writes before returning.
Peers on one GPU share a host; the link assumes they also share its network namespace (abstract
Unix names live there), as Ray workers of one node do.

Agreement between the sender's deadline and the receiver's ack: the sender alone reads its
ACKs, so whether the ACK came (and settled) before its deadline is its own decision, and it writes
the CONFIRM only for an ACK it counted; past the deadline it stops reading, never confirms, and
breaks the channel. The receiver counts its copy only on the CONFIRM, so it never keeps bytes the sender
may already have reused. A dead peer closes both sockets (EOF): every waiter on either side
fails at once.

Frame: kind (1 byte), seq (8), body length (4), body.
"""

from __future__ import annotations

import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from kvrelay.workers.transport.trace import Span, mark
from kvrelay.workers.transport.wire import TransferError


class Kind(IntEnum):
    HEADER = 1  # a transfer's header (wire.py: JSON, then the block ids' binary section)
    ACK = 2  # the receiver stopped reading the sender's memory for seq
    CONFIRM = 3  # the sender counts seq's copy
    BROKEN = 4  # the sender of this frame broke the channel (body: why)


_FRAME = struct.Struct("!BQI")  # kind, seq, body length
_MAX_BODY = 64 << 20  # a header names at most ~8M block ids (8 bytes each); more is a broken peer
_TOKEN_BYTES = 32  # hex characters of the connect token
_OUT_OF_RANK = (b"0", b"1")  # after the token: whose sending connection this is


class Frame(NamedTuple):
    kind: Kind
    seq: int
    body: bytes


class Link:
    """One end of a channel's control link: ``out`` (we send headers, the peer acks) and
    ``inp`` (the peer sends headers, we ack). :meth:`publish` belongs to the channel's sender
    (one at a time: its send lock), :meth:`recv` to its reader thread, :meth:`ack` to any thread.
    Every method is safe after :meth:`close` (it fails instead of blocking)."""

    def __init__(self, out: socket.socket, inp: socket.socket) -> None:
        self._out = _Conn(out)
        self._inp = _Conn(inp)
        self._cv = threading.Condition()  # guards the fields below
        self._verdicts: dict[int, bool] = {}  # our acks waiting for the peer's CONFIRM
        self.down: str | None = None  # why the link is closed

    # ---- sender ----------------------------------------------------------------------------
    def publish(
        self,
        seq: int,
        header: bytes,
        deadline: float,
        settle: Callable[[bytes], bool] | None = None,
        span: Span | None = None,
    ) -> bool:
        """Send a header, read its ACK and confirm it: True; False when the deadline passed
        first (we stop reading: a later ACK is never confirmed). ``settle(ack body)``, when
        given, runs between the ACK and the CONFIRM: False (it gave up at the deadline) means no
        CONFIRM and False. TransferError when the link is down. ``span``: marks (trace.py)."""
        try:
            self._out.send(Kind.HEADER, seq, header)
            mark(span, "header_sent")
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                frame = self._out.read(remaining)
                if frame is None:  # timed out
                    return False
                if frame.kind != Kind.ACK:
                    raise TransferError(f"frame kind {frame.kind} where an ACK belongs")
                if frame.seq == seq:  # (an older seq's ACK came after its sender gave up)
                    mark(span, "ack_read")
                    if settle is not None and not settle(frame.body):
                        return False
                    mark(span, "settled")
                    self._out.send(Kind.CONFIRM, seq)
                    mark(span, "confirm_sent")
                    return True
        except (OSError, EOFError) as exc:
            raise self._lost(f"channel link down: {self.down or exc}") from exc

    def send_broken(self, seq: int, reason: str) -> None:
        """Tell the peer's reader we broke the channel (best effort)."""
        try:
            self._out.send(Kind.BROKEN, seq, reason.encode())
        except OSError:
            pass

    # ---- receiver --------------------------------------------------------------------------
    def ack(
        self, seq: int, wait_until: float | None, body: bytes = b"", span: Span | None = None
    ) -> bool:
        """Tell the sender we stopped reading its memory for ``seq`` (or, with a ``body`` the
        sender's settle understands, when we will have). With ``wait_until``: wait for its
        CONFIRM and return whether the copy counts (False: it gave up first, the link went
        down, or no answer by then). Without: only send (the CONFIRM then comes out of
        :meth:`recv`); True when sent. ``span``: marks of a waiting ack (trace.py)."""
        if wait_until is None:
            return self._try_ack(seq, body)
        with self._cv:
            self._verdicts[seq] = False
        try:
            if not self._try_ack(seq, body):
                return False
            mark(span, "ack_sent")
            with self._cv:
                while not self._verdicts[seq] and self.down is None:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                mark(span, "confirmed")
                return self._verdicts[seq]
        finally:
            with self._cv:
                del self._verdicts[seq]

    # ---- reader thread ---------------------------------------------------------------------
    def recv(self) -> Frame:
        """The peer's next HEADER, BROKEN, or CONFIRM of an ack sent without waiting (awaited
        CONFIRMs are handed to their :meth:`ack` here). TransferError once the link is down
        (EOF: the peer closed it or died)."""
        while True:
            try:
                frame = self._inp.read(None)
            except (OSError, EOFError) as exc:
                raise self._lost(f"the peer closed the channel ({exc})") from exc
            assert frame is not None  # no timeout
            if frame.kind == Kind.CONFIRM:
                with self._cv:
                    if frame.seq in self._verdicts:
                        self._verdicts[frame.seq] = True
                        self._cv.notify_all()
                        continue
            return frame

    # ---- both ------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Take the link down (idempotent): waiters fail, the reader and the peer see EOF. The
        descriptors themselves are released by :meth:`release` (the reader thread, when done)."""
        with self._cv:
            if self.down is None:
                self.down = reason
            self._cv.notify_all()
        self._out.shutdown()
        self._inp.shutdown()

    def release(self) -> None:
        """Close the descriptors (after :meth:`close`; only the reader thread, once done)."""
        self._out.close()
        self._inp.close()

    def _try_ack(self, seq: int, body: bytes) -> bool:
        try:
            self._inp.send(Kind.ACK, seq, body)
            return True
        except OSError:
            return False

    def _lost(self, reason: str) -> TransferError:
        self.close(reason)
        return TransferError(reason)


class _Conn:
    """One connection: frames written whole under a lock; read by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        self._sock = sock
        self._wlock = threading.Lock()  # one frame at a time
        self._rlock = threading.Lock()  # one reader; close waits for it
        self._fdlock = threading.Lock()  # shutdown vs close of the descriptor
        self._buf = bytearray()
        self._poll = select.poll()  # (the reader's) wait with a timeout, socket left blocking
        self._poll.register(sock, select.POLLIN)

    def send(self, kind: Kind, seq: int, body: bytes = b"") -> None:
        frame = _FRAME.pack(kind, seq, len(body)) + body
        with self._wlock:
            self._sock.sendall(frame)

    def read(self, timeout: float | None) -> Frame | None:
        """The next frame; None when ``timeout`` (seconds) passed first. EOFError at EOF."""
        with self._rlock:
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                if len(self._buf) >= _FRAME.size:
                    kind, seq, n = _FRAME.unpack_from(self._buf)
                    if n > _MAX_BODY:
                        raise ValueError(f"a {n}-byte frame on a control link")
                    if len(self._buf) >= _FRAME.size + n:
                        body = bytes(self._buf[_FRAME.size : _FRAME.size + n])
                        del self._buf[: _FRAME.size + n]
                        return Frame(Kind(kind), seq, body)
                if end is not None:
                    remaining = end - time.monotonic()
                    if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
                        return None
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed")
                self._buf += chunk

    def shutdown(self) -> None:
        """Wake the reader and any writer blocked on this connection; the peer sees EOF."""
        with self._fdlock:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already shut down or closed
                pass

    def close(self) -> None:
        with self._wlock, self._rlock, self._fdlock:  # nobody mid-read or mid-write
            self._sock.close()


def accept_link(publish: Callable[[str], None], deadline: float) -> Link:
    """Rank 0's end: listen, ``publish`` ``"<name> <token>"`` (to the store) and accept rank 1's
    two connections (token, then whose sending connection it is); any other is dropped. OSError
    or TransferError when the peer did not connect by ``deadline``."""
    token = secrets.token_hex(_TOKEN_BYTES // 2).encode()
    name = f"kvrelay-link-{secrets.token_hex(16)}"
    got: dict[bytes, socket.socket] = {}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind("\0" + name)  # abstract namespace
            listener.listen(4)
            publish(f"{name} {token.decode()}")
            while len(got) < 2:
                listener.settimeout(_remaining(deadline))
                sock, _ = listener.accept()
                try:
                    role = _greeting(sock, token, deadline)
                except BaseException:
                    sock.close()
                    raise
                if role is None or role in got:
                    sock.close()  # not our peer (or it went away): keep waiting for the real one
                else:
                    got[role] = sock
    except BaseException:
        for sock in got.values():
            sock.close()
        raise
    return Link(out=got[_OUT_OF_RANK[0]], inp=got[_OUT_OF_RANK[1]])


def connect_link(address: bytes, deadline: float) -> Link:
    """Rank 1's end: connect twice to what rank 0 published, presenting its token."""
    name, token = address.decode().split()
    socks: list[socket.socket] = []
    try:
        for role in (_OUT_OF_RANK[1], _OUT_OF_RANK[0]):  # ours, then rank 0's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(_remaining(deadline))
            sock.connect("\0" + name)
            sock.sendall(token.encode() + role)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return Link(out=socks[0], inp=socks[1])


def _greeting(sock: socket.socket, token: bytes, deadline: float) -> bytes | None:
    """The role a connection presents after the right token, else None."""
    want = _TOKEN_BYTES + 1
    got = b""
    try:
        sock.settimeout(_remaining(deadline))
        while len(got) < want and (chunk := sock.recv(want - len(got))):
            got += chunk
    except OSError:
        return None
    if len(got) < want or got[:-1] != token or got[-1:] not in _OUT_OF_RANK:
        return None
    return got[-1:]


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferError("deadline passed while connecting the channel")
    return remaining
