"""One live connection between two workers: a pair channel with its reader thread and inbox.

Protocol of a channel (both directions are symmetric; ``me`` / ``peer`` are ranks 0 and 1)::

    sender (under the channel's send lock)          receiver's reader thread (one per channel)
    seq = send_seq++                                 wait  <prefix>/to<me>/msg/<recv_seq>
    set   <prefix>/to<peer>/msg/<seq> = header  ──▶  get + delete it, check seq, size
    payload: gloo send(tag=seq)                ──▶  gloo recv(tag=seq) into a fresh buffer
             | CUDA IPC: wait ack/<seq>        ◀──  | IPC: rebuild, clone, sync, set ack/<seq>
                                                     deliver (transfer id -> payload) to inbox

The receiving *callers* never touch the wire: they wait on the peer's :class:`Inbox` for their
transfer id, so two transfers on one pair may be awaited in any order by any threads and each
caller gets its own payload. The send lock plus the store sequence keep messages in order.

Breaking: any error (peer closed the socket, a deadline passed with a send posted, a bad
header) breaks the channel once: waiters of this channel fail at once, the peer's reader is told
(``__broken__`` written to the key it waits on), the group is aborted, and the pair epoch is
bumped with a compare-and-set so both sides agree on the next prefix.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from kvrelay.workers.transport.buffers import BufferPool
from kvrelay.workers.transport.ipc import export_ipc, import_ipc
from kvrelay.workers.transport.wire import (
    BROKEN,
    STOP,
    Header,
    TransferError,
    ack_key,
    checksum,
    msg_key,
)


@dataclass(frozen=True, slots=True)
class Arrival:
    header: Header
    payload: torch.Tensor  # [*header.shape] of header.dtype, owned by the receiver
    buffer: torch.Tensor | None = None  # the pooled host buffer under payload, to give back


class Inbox:
    """Payloads that arrived from one peer, by transfer id (survives channel replacement)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: dict[str, Arrival] = {}
        self._abandoned: set[str] = set()  # waiters gave up: drop these when they arrive
        self._failed: dict[int, str] = {}  # channel generation -> why it broke

    def deliver(self, arrival: Arrival) -> None:
        with self._cv:
            tid = arrival.header.transfer_id
            if tid in self._abandoned:
                self._abandoned.discard(tid)
                return
            self._items[tid] = arrival
            self._cv.notify_all()

    def fail(self, generation: int, reason: str) -> None:
        with self._cv:
            self._failed[generation] = reason
            self._cv.notify_all()

    def take(self, transfer_id: str, generation: int, deadline: float) -> Arrival:
        with self._cv:
            while True:
                item = self._items.pop(transfer_id, None)
                if item is not None:
                    return item
                if generation in self._failed:
                    raise TransferError(f"transfer {transfer_id!r}: {self._failed[generation]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._abandoned.add(transfer_id)
                    raise TransferError(f"transfer {transfer_id!r}: deadline passed waiting")
                self._cv.wait(remaining)

    def pending(self) -> int:
        with self._cv:
            return len(self._items)


class Channel:
    """A pair's live connection at one prefix. ``pg`` is None on the same-GPU (IPC) path."""

    def __init__(
        self,
        *,
        prefix: str,
        rank: int,
        generation: int,
        pg: Any,  # dist.ProcessGroupGloo (its stubs lack send/recv) or None
        ctl: dist.Store,
        reader_store: dist.Store,
        sender_store: dist.Store,
        inbox: Inbox,
        device: torch.device,
        max_message_bytes: int,
        buffers: BufferPool,
        on_break: Callable[[], None],
        on_header: Callable[[Header], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.rank = rank
        self.peer_rank = 1 - rank
        self.generation = generation
        self.pg = pg
        self._ctl = ctl
        self._reader_store = reader_store
        self._sender_store = sender_store  # IPC ack waits (serialised by the send lock)
        self._inbox = inbox
        self._device = device
        self._max_message_bytes = max_message_bytes
        self._buffers = buffers
        self._on_break = on_break
        self._on_header = on_header  # observer: a payload is about to be received (metrics)
        self._send_lock = threading.Lock()
        self._ipc_stage: torch.Tensor | None = None  # [bytes] uint8 on device (IPC sender)
        self._ipc_imports: dict[str, torch.Tensor] = {}  # peer stage mappings by handle
        self._state_lock = threading.Lock()
        self.send_seq = 0
        self.recv_seq = 0
        self.broken: str | None = None
        self._stopping = False
        self._reader = threading.Thread(
            target=self._read_loop, name=f"kvrelay-kv-reader:{prefix}", daemon=True
        )
        self._reader.start()

    # ---- sending ---------------------------------------------------------------------------
    def send(self, transfer_id: str, payload: torch.Tensor, deadline: float, crc: bool) -> int:
        """Send one payload; returns its byte count. Raises TransferError (channel broken)."""
        with self._send_lock:
            if self.broken is not None:
                raise TransferError(f"channel broken: {self.broken}")
            seq = self.send_seq
            self.send_seq += 1
            payload = payload.detach().contiguous()
            header = Header(
                seq=seq,
                transfer_id=transfer_id,
                dtype=payload.dtype,
                shape=tuple(payload.shape),
                nbytes=payload.numel() * payload.element_size(),
                crc=checksum(payload) if crc else None,
            )
            try:
                if self.pg is None:
                    self._send_ipc(header, payload, deadline)
                else:
                    self._send_gloo(header, payload, deadline)
            except Exception as exc:  # gloo raises RuntimeError subclasses of many kinds
                self.break_(f"send of {transfer_id!r} failed: {exc}")
                raise TransferError(f"send of {transfer_id!r} failed: {exc}") from exc
            return header.nbytes

    def _send_gloo(self, header: Header, payload: torch.Tensor, deadline: float) -> None:
        assert self.pg is not None
        wire = payload.cpu() if payload.is_cuda else payload  # cross-GPU: staged through host
        flat = wire.reshape(-1).view(torch.uint8)
        self._ctl.set(msg_key(self.prefix, self.peer_rank, header.seq), header.encode())
        work = self.pg.send([flat], self.peer_rank, header.seq & 0x7FFFFFFF)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not work.wait(datetime.timedelta(seconds=remaining)):
            raise TransferError("deadline passed before the payload was sent")

    def _send_ipc(self, header: Header, payload: torch.Tensor, deadline: float) -> None:
        # One persistent staging buffer per channel (grown on demand): the peer maps its handle
        # once and keeps the mapping, since opening an IPC handle costs milliseconds. The ack
        # below says the peer has copied out, so the next send may overwrite it.
        if self._ipc_stage is None or self._ipc_stage.numel() < header.nbytes:
            self._ipc_stage = torch.empty(header.nbytes, dtype=torch.uint8, device=payload.device)
        stage = self._ipc_stage[: header.nbytes]
        stage.copy_(payload.reshape(-1).view(torch.uint8))
        # Synchronise rather than rely on the IPC event: a receiver that already maps this
        # buffer (torch's shared_cache hit) does not wait on the event of a later export.
        torch.cuda.current_stream(payload.device).synchronize()
        wire = replace(header, ipc=export_ipc(stage))
        ack = ack_key(self.prefix, self.rank, header.seq)
        self._ctl.set(msg_key(self.prefix, self.peer_rank, header.seq), wire.encode())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError("deadline passed before the peer took the IPC handle")
        self._sender_store.wait([ack], datetime.timedelta(seconds=remaining))
        self._ctl.delete_key(ack)

    # ---- receiving (reader thread) -----------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            while True:
                key = msg_key(self.prefix, self.rank, self.recv_seq)
                self._reader_store.wait([key])
                raw = self._reader_store.get(key)
                self._reader_store.delete_key(key)
                if self._stopping or raw == STOP.encode():
                    return
                if raw == BROKEN.encode():
                    self.break_("peer reported the channel broken", tell_peer=False)
                    return
                header = Header.decode(raw)
                if header.seq != self.recv_seq:
                    raise TransferError(f"header seq {header.seq} != expected {self.recv_seq}")
                if header.nbytes > self._max_message_bytes:
                    raise TransferError(f"payload of {header.nbytes} bytes over the limit")
                if self._on_header is not None:
                    self._on_header(header)
                payload, buffer = self._recv_payload(header)
                if header.crc is not None and checksum(payload) != header.crc:
                    raise TransferError(f"checksum mismatch in {header.transfer_id!r}")
                self.recv_seq += 1
                self._inbox.deliver(Arrival(header, payload, buffer))
        except Exception as exc:
            if not self._stopping:
                self.break_(f"receive failed: {exc}")
        finally:
            self._ipc_imports.clear()  # unmap the peer's staging buffers

    def _recv_payload(self, header: Header) -> tuple[torch.Tensor, torch.Tensor | None]:
        if header.ipc is not None:
            if self.pg is not None:
                raise TransferError("IPC header on a gloo channel")
            # import_ipc hits torch's shared_cache while we hold the mapping (no re-open) and
            # releases each export's ref counter; holding it here keeps that cache warm.
            stage = import_ipc(header.ipc, header.nbytes, self._device)
            self._ipc_imports.pop(header.ipc["handle"], None)
            self._ipc_imports[header.ipc["handle"]] = stage  # most recent last; keep two
            while len(self._ipc_imports) > 2:
                self._ipc_imports.pop(next(iter(self._ipc_imports)))
            flat = stage[: header.nbytes].clone()
            torch.cuda.current_stream(self._device).synchronize()  # copied out before the ack
            payload = flat.view(header.dtype).reshape(header.shape)
            self._ctl.set(ack_key(self.prefix, self.peer_rank, header.seq), "1")
            return payload, None
        if self.pg is None:
            raise TransferError("gloo header on an IPC channel")
        buf = self._buffers.take(header.nbytes)
        self.pg.recv([buf], self.peer_rank, header.seq & 0x7FFFFFFF).wait()
        return buf.view(header.dtype).reshape(header.shape), buf

    # ---- lifecycle ---------------------------------------------------------------------------
    def break_(self, reason: str, *, tell_peer: bool = True) -> None:
        """Mark broken (once): fail waiters, tell the peer, abort the group, bump the epoch."""
        with self._state_lock:
            if self.broken is not None:
                return
            self.broken = reason
        self._inbox.fail(self.generation, reason)
        try:
            if tell_peer:  # wake the peer's reader, which waits on our next sequence number
                self._ctl.compare_set(
                    msg_key(self.prefix, self.peer_rank, self.send_seq), "", BROKEN
                )
            self._wake_reader()
            self._on_break()
        except Exception:  # the store itself may be gone; the channel is broken regardless
            pass
        self._abort_group()

    def close(self, reason: str = "transport closed") -> None:
        """Stop without blaming the peer (shutdown, or the pair moved to a newer prefix)."""
        with self._state_lock:
            if self._stopping:
                return
            self._stopping = True
            if self.broken is None:
                self.broken = reason
        self._inbox.fail(self.generation, reason)
        try:
            self._wake_reader()
        except Exception:
            pass
        self._abort_group()

    def _wake_reader(self) -> None:
        self._ctl.compare_set(msg_key(self.prefix, self.rank, self.recv_seq), "", STOP)

    def _abort_group(self) -> None:
        if self.pg is not None:
            try:
                self.pg.abort()
            except Exception:
                pass

    def join(self, timeout: float) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()
