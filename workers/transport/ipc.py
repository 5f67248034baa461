"""Same-GPU KV handoff through CUDA IPC handles (NCCL refuses two ranks on one GPU).

Two uses, both written as plain JSON fields (never pickle) in the header the sender sends on
the channel's control link (``torch.multiprocessing.reductions.reduce_tensor`` /
``rebuild_cuda_tensor``):

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
"""

from __future__ import annotations

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
