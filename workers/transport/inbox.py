"""The receiving side of a channel (channel.py): what arrived from one peer, by transfer id
(:class:`Inbox`, which outlives a broken channel), and the peer's same-GPU blocks that an arrival
names instead of carrying a payload (:class:`BlockSource`: the receiving caller copies them out
and acks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kvrelay.kernels import pack_blocks
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.transport.ipc import device_ids
from kvrelay.workers.transport.trace import Span, mark
from kvrelay.workers.transport.wire import Header, TransferError, checksum

T = TypeVar("T")
_CONFIRM_GRACE_S = 1.0  # the least a receiver waits for the sender's CONFIRM after its ACK


class BlockSource:
    """Blocks of the peer's KV cache, mapped here (same GPU), that a transfer names: valid until
    :meth:`read` (or :meth:`release`) acks them, and only while the channel lives.
    ``release(wait_until)``: ack; with a time, wait for the sender's word and say whether the
    copy counts (False: it gave up first or is gone); with None, only ack (nobody reads).
    ``ready``: the sender's event to wait for before reading (None: it synchronised);
    ``done``: our event to record after the copy, which the ack names (None: synchronise);
    ``trace``: this transfer's receive record while tracing (trace.py), finished by :meth:`read`."""

    def __init__(
        self,
        cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]: the peer's memory
        block_ids: torch.Tensor,  # [n] long, host
        generation: int,
        crc: int | None,
        release: Callable[[float | None], bool],
        ready: Any = None,  # torch.cuda.Event, opened from the peer's handle
        done: Any = None,  # torch.cuda.Event, ours (IpcEvents.done)
        trace: Span | None = None,
    ) -> None:
        self.cache = cache
        self.block_ids = block_ids
        self.generation = generation
        self._crc = crc
        self.release = release
        self._ready = ready
        self._done = done
        self.trace = trace

    def read(self, fn: Callable[..., T], deadline: float, dst_ids: torch.Tensor | None = None) -> T:
        """``fn(cache, block_ids)`` (device work on the current stream; ``block_ids`` on the
        cache's device), or ``fn(cache, block_ids, dst_ids)`` when ``dst_ids`` is given (host ids
        ride the same upload as the source's: one pinned copy, one transfer), finished
        (synchronised, or our done event recorded for the sender to wait on), then acked. TransferError when the sender gave up before the ack (its blocks
        may have changed) or did not confirm it by ``deadline`` (at least _CONFIRM_GRACE_S
        after the ack); its CONFIRM comes only once the copy finished."""
        span = self.trace
        try:
            with GPU_GATE.work():
                if not self.cache.is_cuda:
                    args = (self.block_ids,) if dst_ids is None else (self.block_ids, dst_ids)
                    out = fn(self.cache, *args)
                    mark(span, "launched")
                else:
                    stream = torch.cuda.current_stream(self.cache.device)
                    dev = self.cache.device
                    if dst_ids is None:
                        args = (device_ids(self.block_ids, dev),)
                    elif dst_ids.device.type == "cpu":
                        both = device_ids(torch.stack((self.block_ids, dst_ids)), dev)
                        args = (both[0], both[1])
                    else:
                        args = (device_ids(self.block_ids, dev), dst_ids)
                    mark(span, "ids")
                    if self._ready is not None:
                        self._await_ready(stream)
                    mark(span, "ready")
                    try:
                        out = fn(self.cache, *args)
                        mark(span, "launched")
                    finally:  # whatever was launched must finish before the sender moves on
                        if self._done is not None:
                            self._done.record(stream)
                        else:
                            stream.synchronize()
                        mark(span, "done")
                crc = (
                    None if self._crc is None else checksum(pack_blocks(self.cache, self.block_ids))
                )
        finally:  # the sender answers an ACK at once while alive: wait past a deadline the
            # copy itself ran into, so a finished copy is not thrown away for that
            acked = self.release(max(deadline, time.monotonic() + _CONFIRM_GRACE_S))
            if span is not None:
                span.finish()
        if not acked:
            raise TransferError("the sender gave up before the copy finished")
        if crc != self._crc:
            raise TransferError("checksum mismatch in the peer's blocks")
        return out

    def _await_ready(self, stream: torch.cuda.Stream) -> None:
        """Order our copy after the sender's writes: on the device, unless its ready event
        already completed (the usual case: then no cross-process wait at all, which matters
        because a wait on the event of a sender that died is undefined behaviour)."""
        try:
            if not self._ready.query():
                stream.wait_event(self._ready)
        except RuntimeError as exc:  # a CUDA error on the peer's event (say, the peer died)
            raise TransferError(f"the sender's ready event: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Arrival:
    header: Header
    payload: torch.Tensor | None  # [*header.shape] of header.dtype, owned by the receiver
    buffer: torch.Tensor | None = None  # the pooled host buffer under payload, to give back
    source: BlockSource | None = None  # same-GPU blocks to copy out instead of a payload


class Inbox:
    """Payloads that arrived from one peer, by transfer id (survives channel replacement).
    Block sources are dropped when their channel fails (the peer's memory is no longer
    promised) and acked when their waiter gave up (so the peer's send is not held)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: dict[str, Arrival] = {}
        self._abandoned: set[str] = set()  # waiters gave up: drop these when they arrive
        self._failed: dict[int, str] = {}  # channel generation -> why it broke

    def deliver(self, arrival: Arrival) -> None:
        source = arrival.source
        with self._cv:
            tid = arrival.header.transfer_id
            dropped = tid in self._abandoned
            if dropped:
                self._abandoned.discard(tid)
            elif source is not None and source.generation in self._failed:
                return
            else:
                self._items[tid] = arrival
                self._cv.notify_all()
        if dropped and source is not None:
            source.release(None)

    def fail(self, generation: int, reason: str) -> None:
        with self._cv:
            self._failed[generation] = reason
            for tid in [
                t
                for t, a in self._items.items()
                if a.source is not None and a.source.generation == generation
            ]:
                del self._items[tid]
            self._cv.notify_all()

    def take(self, transfer_id: str, generation: int, deadline: float) -> Arrival:
        with self._cv:
            while True:
                item = self._items.pop(transfer_id, None)
                if item is not None:
                    return _taken(item)
                if generation in self._failed:
                    raise TransferError(f"transfer {transfer_id!r}: {self._failed[generation]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._abandoned.add(transfer_id)
                    raise TransferError(f"transfer {transfer_id!r}: deadline passed waiting")
                self._cv.wait(remaining)

    def pop(self, transfer_id: str) -> Arrival | None:
        """The arrival of ``transfer_id`` if it is here, without waiting."""
        with self._cv:
            item = self._items.pop(transfer_id, None)
        return None if item is None else _taken(item)

    def pending(self) -> int:
        with self._cv:
            return len(self._items)


def _taken(item: Arrival) -> Arrival:
    """Mark a traced arrival taken by its caller (trace.py: ``woke``)."""
    if item.source is not None and item.source.trace is not None:
        item.source.trace.mark("woke")
    return item
