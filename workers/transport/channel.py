"""One live connection between two workers: a pair channel with its reader thread and inbox.

Protocol of a channel (both directions are symmetric; ``me`` / ``peer`` are ranks 0 and 1).
Cross-GPU (gloo) channels carry headers through the store, payloads through the process group::

    sender (under the channel's send lock)          receiver's reader thread (one per channel)
    seq = send_seq++                                 get (blocks)  <prefix>/to<me>/msg/<seq>
    set   <prefix>/to<peer>/msg/<seq> = header  ──▶  check seq, size; then delete the key
    payload: gloo send(tag=seq)                ──▶  gloo recv(tag=seq) into a fresh buffer
                                                     deliver (transfer id -> payload) to inbox

Same-GPU (CUDA IPC) channels carry everything on their control :class:`~.link.Link` (two Unix
socket connections opened once per channel): the header, the receiver's ACK once it stopped
reading the sender's memory, the sender's CONFIRM that the copy counts (link.py: how the
sender's deadline and the ack agree)::

    send_blocks: record our ready event; HEADER ──▶  map the sender's cache once; deliver a
                 (names blocks of our cache,          BlockSource; the *caller* waits for the
                 exported once, and the event)        ready event on the device, copies,
                 read the ACK; poll the done   ◀──  records its done event, ACK (names it),
                 event; CONFIRM                       waits for the CONFIRM
    send:        HEADER (our staging buffer)   ──▶  map, clone, sync, ACK; deliver on CONFIRM

(Without IPC events, ipc.py: the sender synchronises its stream before the HEADER, the receiver
its copy before the ACK, and the ACK names nothing.)

Tracing (trace.py, off by default): each side of a same-GPU ``send_blocks`` keeps a record of
its steps' times (the marks only observe; nothing above waits on them or changes with them).

The receiving *callers* never touch the wire: they wait on the peer's :class:`Inbox` (inbox.py)
for their transfer id, so two transfers on one pair may be awaited in any order by any threads
and each caller gets its own payload. The send lock plus the sequence numbers keep messages in order.

Same-GPU ``send_blocks`` moves no bytes on the sender: its header names blocks of the sender's
KV cache (exported once per channel), and the receiver's ``recv_blocks`` copies them into its own
blocks in one device pass (:class:`BlockSource`, inbox.py). The sender returns once the receiver acked, so
the caller's guarantee that it keeps those blocks until ``send_blocks`` returns is what makes
the read safe; such a send therefore completes only when the peer calls its receive (the
controller runs both sides concurrently).

Breaking: any error (peer closed the socket, a deadline passed with a send posted, a bad
header) breaks the channel once: waiters of this channel fail at once (and blocks not yet copied
from the peer's cache are dropped: its memory is no longer promised), the peer's reader is told
(``__broken__`` written to the key it waits on, or a BROKEN frame and the link shut down), the
group is aborted, and the pair epoch is bumped with a compare-and-set so both sides agree on the
next prefix.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from kvrelay.kernels import pack_blocks
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.transport.buffers import BufferPool
from kvrelay.workers.transport.inbox import Arrival, BlockSource, Inbox
from kvrelay.workers.transport.ipc import (
    IpcEvents,
    export_ipc,
    import_ipc,
    open_event,
    poll,
)
from kvrelay.workers.transport.link import Kind, Link
from kvrelay.workers.transport.trace import Span, Tracer, mark
from kvrelay.workers.transport.wire import (
    BROKEN,
    STOP,
    Header,
    TransferError,
    block_ids_section,
    block_source,
    checksum,
    msg_key,
    payload_nbytes,
)

K = TypeVar("K")
V = TypeVar("V")


class Channel:
    """A pair's live connection at one prefix: over ``pg`` (gloo; headers through the store,
    read by ``reader_store``), or on the same GPU (CUDA IPC) over ``link`` with ``pg`` None."""

    def __init__(
        self,
        *,
        prefix: str,
        rank: int,
        generation: int,
        pg: Any,  # dist.ProcessGroupGloo (its stubs lack send/recv) or None
        link: Link | None,
        ctl: dist.Store,
        reader_store: dist.Store | None,
        inbox: Inbox,
        device: torch.device,
        max_message_bytes: int,
        buffers: BufferPool,
        on_break: Callable[[], None],
        on_header: Callable[[Header], None] | None = None,
        events: IpcEvents | None = None,
        tracer: Tracer | None = None,
        peer: str = "",
    ) -> None:
        """``events``: this side's IPC events for the peer (same GPU; None: host syncs).
        ``tracer``: where same-GPU block receives are traced while it is enabled (trace.py),
        as transfers with ``peer`` (the peer's worker id)."""
        self.prefix = prefix
        self.rank = rank
        self.peer_rank = 1 - rank
        self.generation = generation
        self.pg = pg
        self.link = link
        self._ctl = ctl
        self._reader_store = reader_store
        self._inbox = inbox
        self._device = device
        self._max_message_bytes = max_message_bytes
        self._buffers = buffers
        self._on_break = on_break
        self._on_header = on_header  # observer: a payload is about to be received (metrics)
        self._send_lock = threading.Lock()
        self._ipc_stage: torch.Tensor | None = None  # [bytes] uint8 on device (IPC sender)
        self._ipc_exports: dict[tuple[int, int], dict[str, Any]] = {}  # our caches, exported
        self._staged: dict[int, Arrival] = {}  # copied out and acked, delivered on the CONFIRM
        self._ipc_imports: dict[str, torch.Tensor] = {}  # peer stage mappings by handle
        self._ipc_caches: dict[tuple[str, int, int], torch.Tensor] = {}  # peer caches (uint8)
        self.events = events
        self._tracer = tracer if tracer is not None else Tracer()
        self._trace_peer = peer
        self._peer_ready: dict[str, Any] = {}  # the peer's ready events (reader thread)
        self._peer_done: dict[bytes, Any] = {}  # the peer's done events (sender, send lock)
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
        payload = payload.detach().contiguous()

        def send(seq: int) -> int:
            header = Header(
                seq=seq,
                transfer_id=transfer_id,
                dtype=payload.dtype,
                shape=tuple(payload.shape),
                nbytes=payload.numel() * payload.element_size(),
                crc=checksum(payload) if crc else None,
            )
            if self.link is not None:
                self._send_ipc(header, payload, deadline)
            else:
                self._send_gloo(header, payload, deadline)
            return header.nbytes

        return self._transmit(transfer_id, send)

    def send_blocks(
        self,
        transfer_id: str,
        kv_cache: torch.Tensor,
        block_ids: torch.Tensor,
        deadline: float,
        crc: bool,
        span: Span | None = None,
    ) -> int:
        """Same GPU: name ``block_ids`` of our (contiguous, CUDA) ``kv_cache`` and wait until the
        peer copied them out; returns the bytes it copied. No pack, no staging copy. ``span``:
        this transfer's send record while tracing (trace.py), finished here."""
        if self.link is None:
            raise TransferError("block ids travel only on a same-GPU channel")
        shape = (int(block_ids.numel()), *kv_cache.shape[1:])

        def send(seq: int) -> int:
            flat = kv_cache.view(-1).view(torch.uint8)
            key = (flat.data_ptr(), flat.numel())
            if key not in self._ipc_exports:  # once per cache: the peer keeps its mapping
                self._ipc_exports[key] = export_ipc(flat)
            mark(span, "exported")
            ipc = {**self._ipc_exports[key], "cache_shape": list(kv_cache.shape)}
            blocks = block_ids_section(block_ids)
            with GPU_GATE.work():
                crc_value = checksum(pack_blocks(kv_cache, block_ids)) if crc else None
                # the blocks' last writes (stream-ordered before this call) must land before
                # the peer, on another stream of another process, reads them: its copy waits
                # for our ready event on the device (or, without events, we wait here)
                stream = torch.cuda.current_stream(kv_cache.device)
                if self.events is not None:
                    self.events.ready.record(stream)
                    ipc["ready"] = self.events.ready_handle
                else:
                    stream.synchronize()
            mark(span, "ready")
            header = Header(
                seq=seq,
                transfer_id=transfer_id,
                dtype=kv_cache.dtype,
                shape=shape,
                nbytes=payload_nbytes(shape, kv_cache.dtype),
                crc=crc_value,
                ipc=ipc,
                blocks=blocks,
            )
            self._publish_and_await(header, deadline, span)
            return header.nbytes

        return self._transmit(transfer_id, send, span)

    def _transmit(
        self, transfer_id: str, send: Callable[[int], int], span: Span | None = None
    ) -> int:
        """Run ``send(seq)`` under the send lock; any error breaks the channel."""
        with self._send_lock:
            if self.broken is not None:
                raise TransferError(f"channel broken: {self.broken}")
            seq = self.send_seq
            self.send_seq += 1
            if span is not None:
                span.prefix, span.seq = self.prefix, seq
                span.mark("locked")
            try:
                return send(seq)
            except Exception as exc:  # gloo raises RuntimeError subclasses of many kinds
                self.break_(f"send of {transfer_id!r} failed: {exc}")
                raise TransferError(f"send of {transfer_id!r} failed: {exc}") from exc
            finally:
                if span is not None:
                    span.finish()

    def _send_gloo(self, header: Header, payload: torch.Tensor, deadline: float) -> None:
        assert self.pg is not None
        with GPU_GATE.work():
            wire = payload.cpu() if payload.is_cuda else payload  # cross-GPU: through the host
        flat = wire.reshape(-1).view(torch.uint8)
        self._ctl.set(msg_key(self.prefix, self.peer_rank, header.seq), header.encode().decode())
        work = self.pg.send([flat], self.peer_rank, header.seq & 0x7FFFFFFF)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not work.wait(datetime.timedelta(seconds=remaining)):
            raise TransferError("deadline passed before the payload was sent")

    def _send_ipc(self, header: Header, payload: torch.Tensor, deadline: float) -> None:
        # One persistent staging buffer per channel (grown on demand): the peer maps its handle
        # once and keeps the mapping, since opening an IPC handle costs milliseconds. The ack
        # says the peer has copied out, so the next send may overwrite it.
        with GPU_GATE.work():
            if not payload.is_cuda:  # a host tensor (a small control value) goes up first
                payload = payload.to(self._device)
            if self._ipc_stage is None or self._ipc_stage.numel() < header.nbytes:
                self._ipc_stage = torch.empty(
                    header.nbytes, dtype=torch.uint8, device=payload.device
                )
            stage = self._ipc_stage[: header.nbytes]
            stage.copy_(payload.reshape(-1).view(torch.uint8))
            # Synchronise rather than rely on the IPC event: a receiver that already maps this
            # buffer (torch's shared_cache hit) does not wait on the event of a later export.
            torch.cuda.current_stream(payload.device).synchronize()
            ipc = export_ipc(stage)
        self._publish_and_await(replace(header, ipc=ipc), deadline)

    def _publish_and_await(self, header: Header, deadline: float, span: Span | None = None) -> None:
        """Send an IPC header on the link and wait for the peer's ack (it stopped reading our
        memory, or names the event that completes when it did); past the deadline the ack no
        longer counts (link.py)."""
        assert self.link is not None
        link = self.link

        def settle(ack: bytes) -> bool:
            """An empty ack: the peer synchronised its copy. Otherwise it names its done
            event, recorded after the copy: poll it (our blocks stay as they are till then)."""
            if not ack:
                return True
            with GPU_GATE.work():
                done = self._peer_event(self._peer_done, ack)

            def finished() -> bool:
                with GPU_GATE.work():
                    return bool(done.query())

            return poll(finished, deadline, lambda: link.down is not None)

        body = header.encode()
        mark(span, "encoded")
        if not link.publish(header.seq, body, deadline, settle, span):
            raise TransferError("deadline passed before the peer copied the payload")

    # ---- receiving (reader thread) -----------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            if self.link is None:
                self._read_store()
            else:
                self._read_link(self.link)
        except Exception as exc:
            if not self._stopping:
                self.break_(f"receive failed: {exc}")
        finally:
            if self.link is not None:
                self.link.close("reader ended")
                self.link.release()
            self._staged.clear()
            self._ipc_imports.clear()  # unmap the peer's staging buffers and caches
            self._ipc_caches.clear()

    def _read_store(self) -> None:
        assert self._reader_store is not None
        while not self._stopping and self.broken is None:
            key = msg_key(self.prefix, self.rank, self.recv_seq)
            raw = self._reader_store.get(key)  # waits for the key (one round trip less)
            if self._stopping or raw == STOP.encode():
                return
            if raw == BROKEN.encode():
                self.break_("peer reported the channel broken", tell_peer=False)
                return
            header = self._check(Header.decode(raw))
            if header.ipc is not None or header.blocks is not None:
                raise TransferError("IPC header on a gloo channel")
            payload, buffer = self._recv_payload(header)
            self.recv_seq += 1
            self._inbox.deliver(Arrival(header, payload, buffer))
            self._reader_store.delete_key(key)  # after delivering: off the copy's path

    def _read_link(self, link: Link) -> None:
        tracer = self._tracer
        while not self._stopping and self.broken is None:
            frame = link.recv()
            t_frame = time.monotonic_ns() if tracer.enabled else 0  # trace.py: "frame"
            if frame.kind == Kind.BROKEN:
                reason = frame.body.decode(errors="replace")
                self.break_(f"peer reported the channel broken: {reason}", tell_peer=False)
                return
            if frame.kind == Kind.CONFIRM:  # a staged payload's copy counts: hand it on
                staged = self._staged.pop(frame.seq, None)
                if staged is not None:
                    self._inbox.deliver(staged)
                continue
            header = self._check(Header.decode(frame.body))
            blocks = block_source(header)
            if blocks is not None:
                span = None
                if t_frame:
                    span = tracer.span(
                        "recv", self._trace_peer, header.transfer_id, "frame", t_frame
                    )
                    span.prefix, span.seq = self.prefix, header.seq
                    span.mark("decoded")
                source = self._block_source(header, *blocks, span=span)
                arrival = Arrival(header, None, source=source)
                self.recv_seq += 1
                mark(span, "deliver")
                self._inbox.deliver(arrival)
            else:
                self._staged[header.seq] = Arrival(header, self._copy_staged(header))
                self.recv_seq += 1
                if not link.ack(header.seq, None):
                    raise TransferError("could not ack a staged payload")

    def _check(self, header: Header) -> Header:
        if header.seq != self.recv_seq:
            raise TransferError(f"header seq {header.seq} != expected {self.recv_seq}")
        if header.nbytes > self._max_message_bytes:
            raise TransferError(f"payload of {header.nbytes} bytes over the limit")
        if self._on_header is not None:
            self._on_header(header)
        return header

    def _block_source(
        self,
        header: Header,
        cache_shape: tuple[int, ...],
        ids: torch.Tensor,  # [n] int64, host (block_source)
        span: Span | None = None,
    ) -> BlockSource:
        assert self.link is not None
        link, seq = self.link, header.seq
        assert header.ipc is not None
        handle = header.ipc.get("ready")  # the sender did not synchronise: wait for this
        with GPU_GATE.work():  # opening a peer's handle maps device memory
            cache = self._peer_cache(header, cache_shape)
            ready = None if handle is None else self._peer_ready_event(handle)
        done = self.events.done if self.events is not None else None
        body = self.events.done_handle if self.events is not None else b""
        source = BlockSource(
            cache,
            ids,
            self.generation,
            header.crc,
            lambda wait_until: link.ack(seq, wait_until, body, span),
            ready=ready,
            done=done,
            trace=span,
        )
        mark(span, "mapped")
        return source

    def _peer_ready_event(self, handle: object) -> Any:
        """The peer's ready event named in a header, opened once per channel."""
        if not isinstance(handle, str):
            raise TransferError("malformed ready event handle")
        return self._peer_event(self._peer_ready, handle)

    def _peer_event(self, opened: dict[Any, Any], handle: bytes | str) -> Any:
        """The peer's event named by ``handle``, opened on first sight and kept in ``opened``
        (one per channel: the last two kept)."""
        event = opened.get(handle)
        if event is None:
            event = open_event(handle, self._device)
            _keep_recent(opened, handle, event, 2)
        return event

    def _peer_cache(self, header: Header, cache_shape: tuple[int, ...]) -> torch.Tensor:
        """The peer's KV cache named by ``header``, mapped once per channel (opening a handle
        costs milliseconds) and kept until the channel ends."""
        fields = header.ipc
        assert fields is not None
        nbytes = payload_nbytes(cache_shape, header.dtype)
        try:
            key = (str(fields["handle"]), int(fields["storage_offset"]), int(fields["offset"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"malformed IPC fields: {exc}") from exc
        flat = self._ipc_caches.get(key)
        if flat is None or flat.numel() < nbytes:
            flat = import_ipc(fields, nbytes, self._device)
            _keep_recent(self._ipc_caches, key, flat, 4)  # a peer exports one; bound stale ones
        return flat[:nbytes].view(header.dtype).view(cache_shape)

    def _copy_staged(self, header: Header) -> torch.Tensor:
        """The peer's staged payload, copied out (synchronised) before we ack."""
        if header.ipc is None:
            raise TransferError("gloo header on an IPC channel")
        # import_ipc hits torch's shared_cache while we hold the mapping (no re-open) and
        # releases each export's ref counter; holding it here keeps that cache warm.
        with GPU_GATE.work():
            stage = import_ipc(header.ipc, header.nbytes, self._device)
            _keep_recent(self._ipc_imports, header.ipc["handle"], stage, 2)
            flat = stage[: header.nbytes].clone()
            torch.cuda.current_stream(self._device).synchronize()  # copied out before the ack
            payload = flat.view(header.dtype).reshape(header.shape)
            crc = None if header.crc is None else checksum(payload)
        if crc != header.crc:
            raise TransferError(f"checksum mismatch in {header.transfer_id!r}")
        return payload

    def _recv_payload(self, header: Header) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pg is not None
        buf = self._buffers.take(header.nbytes)
        self.pg.recv([buf], self.peer_rank, header.seq & 0x7FFFFFFF).wait()
        payload = buf.view(header.dtype).reshape(header.shape)
        if header.crc is not None and checksum(payload) != header.crc:
            raise TransferError(f"checksum mismatch in {header.transfer_id!r}")
        return payload, buf

    # ---- lifecycle ---------------------------------------------------------------------------
    def break_(self, reason: str, *, tell_peer: bool = True) -> None:
        """Mark broken (once): fail waiters, tell the peer, abort the group, bump the epoch."""
        with self._state_lock:
            if self.broken is not None:
                return
            self.broken = reason
        self._inbox.fail(self.generation, reason)
        try:
            if tell_peer:  # wake the peer's reader, which waits on our next message
                if self.link is not None:
                    self.link.send_broken(self.send_seq, reason)
                else:
                    self._ctl.compare_set(
                        msg_key(self.prefix, self.peer_rank, self.send_seq), "", BROKEN
                    )
        except Exception:  # the peer or the store may be gone: broken regardless
            pass
        try:
            self._wake_reader(reason)
            self._on_break()
        except Exception:
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
            self._wake_reader(reason)
        except Exception:
            pass
        self._abort_group()

    def _wake_reader(self, reason: str) -> None:
        """End our reader; on a link also wake every waiter and show the peer EOF."""
        if self.link is not None:
            self.link.close(reason)
        else:
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


def _keep_recent(mappings: dict[K, V], key: K, mapped: V, keep: int) -> None:
    """Remember a mapping of the peer's memory as the most recent; drop the oldest past ``keep``."""
    mappings.pop(key, None)
    mappings[key] = mapped
    while len(mappings) > keep:
        mappings.pop(next(iter(mappings)))
