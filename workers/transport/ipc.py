"""Same-GPU KV handoff through CUDA IPC handles (NCCL refuses two ranks on one GPU).

Two uses, both written as plain JSON fields (never pickle) in the header the sender sends on
the channel's control link (``torch.multiprocessing.reductions.reduce_tensor`` /
``rebuild_cuda_tensor``; block ids travel as bytes next to them, wire.py):

- ``send_blocks``: the sender exports its whole KV cache once per channel and each header names
  block ids in it; the receiver maps the cache once, keeps the mapping, and copies the blocks
  into its own cache in one device pass. No pack, no staging copy, no unpack.
- ``send`` (any tensor): the sender copies it into the channel's persistent uint8 staging buffer
  and exports that; the receiver maps it (once per staging buffer), copies the payload out and
  synchronises.

Either way the receiver acknowledges on the link (link.py: ACK, then the sender's CONFIRM) once
it stopped reading, and only then may the sender reuse or free the memory.

The handle names the *sender's* device index; the receiver opens it on its own index for the
same GPU (peers are matched by GPU UUID, so differing ``CUDA_VISIBLE_DEVICES`` are fine).

``send_blocks`` without host synchronisation (:class:`IpcEvents`, two interprocess events per
side of a channel): the sender records its ``ready`` event after the blocks' writes instead of
synchronising its stream, and the header names it; the receiver's copy waits for it on the
device (``stream.wait_event``, skipped when it already completed), then the receiver records its
own ``done`` event instead of synchronising, and its ACK carries that event's handle; the sender
polls ``done`` on the host (:func:`poll`, bounded by its deadline) before it confirms and
returns. Both ends keep their guarantees: ``send_blocks`` returns once the copy finished,
``recv_blocks`` once it finished and counts. Where the platform has no IPC events (or
``KVTransport(ipc_events=False)``) each side synchronises its stream as before; the receiver
follows the header (a ``ready`` handle is always waited for) and the sender the ACK (an empty
one means the receiver synchronised), so the two modes interoperate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from kvrelay.workers.transport.wire import TransferError

_STORAGE_CLASSES: dict[str, Any] = {
    "TypedStorage": torch.storage.TypedStorage,
    "UntypedStorage": torch.UntypedStorage,
}


def gpu_uuid(device: torch.device) -> str | None:
    """The GPU's UUID (peers on one physical GPU share it), or None off CUDA."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def export_ipc(buffer: torch.Tensor) -> dict[str, Any]:
    """JSON-able fields that let another process on this GPU map ``buffer`` (kept alive by the
    caller until the receiver acknowledges)."""
    if not buffer.is_cuda or buffer.dim() != 1 or buffer.dtype != torch.uint8:
        raise TransferError("IPC export needs a 1-D uint8 CUDA buffer")
    _, args = reduce_tensor(buffer)
    (
        _cls,
        size,
        stride,
        offset,
        storage_cls,
        _dtype,
        _device,
        handle,
        storage_size,
        storage_offset,
        _grad,
        ref_handle,
        ref_offset,
        event_handle,
        event_sync,
    ) = args
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": int(offset),
        "storage_cls": storage_cls.__name__,
        "handle": bytes(handle).hex(),
        "storage_size": int(storage_size),
        "storage_offset": int(storage_offset),
        "ref_handle": bytes(ref_handle).hex(),
        "ref_offset": int(ref_offset),
        "event_handle": None if event_handle is None else bytes(event_handle).hex(),
        "event_sync": bool(event_sync),
    }


def import_ipc(fields: dict[str, Any], nbytes: int, device: torch.device) -> torch.Tensor:
    """Map the sender's uint8 buffer described by ``fields`` (its memory: copy out)."""
    if device.type != "cuda":
        raise TransferError("IPC payload received by a worker that is not on CUDA")
    try:
        storage_cls = _STORAGE_CLASSES[fields["storage_cls"]]
        tensor = rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size(fields["size"]),
            tuple(fields["stride"]),
            int(fields["offset"]),
            storage_cls,
            torch.uint8,
            device.index if device.index is not None else torch.cuda.current_device(),
            bytes.fromhex(fields["handle"]),
            int(fields["storage_size"]),
            int(fields["storage_offset"]),
            False,
            bytes.fromhex(fields["ref_handle"]),
            int(fields["ref_offset"]),
            None if fields["event_handle"] is None else bytes.fromhex(fields["event_handle"]),
            bool(fields["event_sync"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TransferError(f"malformed IPC fields: {exc}") from exc
    if tensor.dim() != 1 or tensor.numel() < nbytes:
        raise TransferError(f"IPC buffer of {tensor.numel()} bytes for a {nbytes}-byte payload")
    return tensor


class IpcEvents:
    """This process's two interprocess events for one peer (``ready``: our sent blocks are
    written; ``done``: our copy of the peer's blocks finished) and their exported handles.

    One pair per channel, re-recorded by each transfer: a record is only read by the peer's
    transfer it was made for, and the protocol orders the next record after that read.
    ``ready`` is recorded by a send, which holds the channel's send lock until the peer's ACK
    (its device wait was issued before it acked) and our poll of its ``done``; ``done`` is
    recorded by our receive of each header, and the peer sends its next header only after it
    saw the previous ``done`` complete. Kept a few channels past their own (kv_transport's
    ``_Pair``): an operation on an import after its exporter destroyed the event is undefined,
    and a broken channel's peer may still hold one.
    """

    def __init__(self, device: torch.device) -> None:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            self.ready = torch.cuda.Event(interprocess=True)
            self.done = torch.cuda.Event(interprocess=True)
            for event in (self.ready, self.done):
                event.record(stream)  # created on this device; a never-recorded one is idle
            self.ready_handle: str = bytes(self.ready.ipc_handle()).hex()  # in headers
            self.done_handle: bytes = bytes(self.done.ipc_handle())  # in ACK bodies

    @staticmethod
    def create(device: torch.device) -> IpcEvents | None:
        """The events, or None where this platform cannot share events between processes."""
        try:
            return IpcEvents(device)
        except RuntimeError:
            return None


def open_event(handle: bytes | str, device: torch.device) -> Any:  # torch.cuda.Event
    """The peer's event named by ``handle`` (raw, or hex as in a header), opened here."""
    try:
        raw = bytes.fromhex(handle) if isinstance(handle, str) else handle
        return torch.cuda.Event.from_ipc_handle(device, raw)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TransferError(f"could not open the peer's IPC event: {exc}") from exc


_SPIN_S = 0.002  # poll without sleeping this long (a 256-block copy takes ~0.14 ms on an H100)


def poll(done: Callable[[], bool], deadline: float, abandoned: Callable[[], bool]) -> bool:
    """Wait on the host until ``done()``: True; False once ``deadline`` passed or
    ``abandoned()`` first. Spins (``sleep(0)`` lets other threads run) for ``_SPIN_S``, then
    sleeps between polls, up to 1 ms. Never blocks inside CUDA: a peer that died leaves its
    event undefined, so a blocking ``synchronize`` on it could hang past any deadline."""
    start = time.monotonic()
    pause = 0.0
    while not done():
        now = time.monotonic()
        if now >= deadline or abandoned():
            return False
        if now - start > _SPIN_S:
            pause = min(max(2 * pause, 5e-5), 1e-3, deadline - now)
        time.sleep(pause)
    return True


def device_ids(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Block ids on ``device`` without a host synchronisation: a pinned copy (torch's caching
    host allocator keeps it until the copy ran) uploaded non-blocking on the current stream."""
    if ids.device == device:
        return ids
    return ids.pin_memory().to(device, non_blocking=True)
