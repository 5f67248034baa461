"""Host lists to device tensors for kernel inputs, without waiting for the stream: the engine's
step inputs, the sampler's parameters and the CPU tier's block ids all go up this way."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_to_device(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A small host list as a device tensor without a stream sync.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory, which synchronises the
    stream (it waits for every queued kernel). A pinned staging tensor copied with
    ``non_blocking`` only enqueues the copy; the caching host allocator keeps the staging block
    until the copy has run.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
