"""Each lane's share of the GPU's streaming multiprocessors (semi-PD's x and y, in percent).

A lane computes inside the share it last ``enter``ed. On CUDA the shares are green contexts
(``torch.cuda.green_contexts.GreenContext``), one per lane and share the split rule may pick, all
created up front: creating one is a driver call, switching is a context push/pop. CUDA
contexts are per thread, so each lane enters its share on its own loop thread, as a command
between two steps: a switch happens at an iteration boundary and never splits a step.

Overlap, measured from torch's source (``aten/src/ATen/cuda/CUDAGreenContext.cpp``):
``GreenContext.create(num_sms=n)`` splits the whole device and keeps the first ``n`` SMs, so
two green contexts overlap on the lowest-numbered SMs. A share is therefore a cap on the SMs a
lane may use (as an MPS active-thread percentage is, and semi-PD's x + y may exceed 100), not
a disjoint slice: with (x, y) = (40, 60) the decode lane's SMs include all of prefill's.
Disjoint slices need the driver's multi-group split (``cuDevSmResourceSplitByCount`` with
two groups), which torch does not expose.

Each lane has its own contexts, also at equal shares: ``GreenContext.set_context`` makes the
context's legacy default stream the thread's current stream (torch 2.11,
``CUDAGreenContext.cpp``: "setContext API uses default stream"), and kernels on one context's
default stream run in issue order. Two lanes sharing the 100 % context (the 100 / 100 start)
were therefore one stream: a decode step queued behind the whole prefill step enqueued before
it (4096 tokens, tens of ms on the H100), which is what the decode ITL p99 spikes under prefill
bursts look like. In two contexts the lanes' kernels are concurrent and share the SMs.

On CPU there is no SM to split: ``CpuPartition`` records each lane's share, so the split rule's
decisions are observable and testable, and changes nothing else (both lanes share the cores
through the OS scheduler).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class Lane(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class Split:
    """SM shares in percent: ``prefill`` is semi-PD's x, ``decode`` its y (each 1..100)."""

    prefill: int
    decode: int

    def __post_init__(self) -> None:
        for name, v in (("prefill", self.prefill), ("decode", self.decode)):
            if not 1 <= v <= 100:
                raise ValueError(f"{name} SM share must be 1..100 percent, got {v}")

    def share(self, lane: Lane) -> int:
        return self.prefill if lane is Lane.PREFILL else self.decode


class SMPartition(Protocol):
    enforced: bool  # False: shares are recorded only (CPU, or a GPU without green contexts)

    def enter(self, lane: Lane, share: int) -> None:
        """Compute in ``share`` percent of the SMs from now on; called on ``lane``'s thread
        between two of its steps."""
        ...

    def share(self, lane: Lane) -> int: ...

    def synchronize(self) -> None:
        """Wait until the calling thread's queued kernels are done (no-op on CPU)."""
        ...


class CpuPartition:
    """Records the shares only: on CPU (no SMs), or on a GPU without green contexts."""

    enforced = False

    def __init__(self, split: Split) -> None:
        self._shares = {lane: split.share(lane) for lane in Lane}

    def enter(self, lane: Lane, share: int) -> None:
        self._shares[lane] = share

    def share(self, lane: Lane) -> int:
        return self._shares[lane]

    def synchronize(self) -> None:
        pass


class GreenContextPartition:
    """One green context per lane and share in ``shares`` (percent), on CUDA device
    ``device_index``."""

    enforced = True

    def __init__(self, device_index: int, shares: Iterable[int], initial: Split) -> None:
        from torch.cuda.green_contexts import GreenContext

        self.device_index = device_index
        self.total_sms = torch.cuda.get_device_properties(device_index).multi_processor_count
        wanted = sorted({*shares, initial.prefill, initial.decode})
        self.num_sms = {s: max(1, round(self.total_sms * s / 100)) for s in wanted}
        self._contexts: dict[tuple[Lane, int], Any] = {
            (lane, s): GreenContext.create(num_sms=n, device_id=device_index)
            for lane in Lane
            for s, n in self.num_sms.items()
        }
        self._shares = {lane: initial.share(lane) for lane in Lane}
        # the context this thread has pushed (``.ctx``): a green context is current per thread
        # and only the thread that pushed it can pop it (CUDA asserts otherwise), so a lane that
        # enters from another thread than before (a restarted lane thread, a test) pushes afresh;
        # thread-local, not keyed by thread id, since a new thread may reuse a dead one's id
        self._pushed = threading.local()

    def enter(self, lane: Lane, share: int) -> None:
        ctx = self._contexts.get((lane, share))
        if ctx is None:
            raise ValueError(f"no green context for a {share}% share; have {sorted(self.num_sms)}")
        old = getattr(self._pushed, "ctx", None)
        if old is not None:
            _call(old, "pop_context", "pop_current")
        _call(ctx, "set_context", "make_current")  # also makes its stream current (this thread)
        self._pushed.ctx = ctx
        self._shares[lane] = share

    def share(self, lane: Lane) -> int:
        return self._shares[lane]

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device_index).synchronize()


def _call(ctx: Any, name: str, older_name: str) -> None:
    """Recent torch names them set_context / pop_context, earlier releases make_current /
    pop_current."""
    (getattr(ctx, name, None) or getattr(ctx, older_name))()


def build_partition(device: torch.device, initial: Split, step: int) -> SMPartition:
    """Green contexts on CUDA for every multiple of ``step`` percent (the split rule moves in
    ``step``s) plus the initial shares; the recording partition on CPU, or (with a warning) on
    a GPU whose torch, driver or CUDA version has no green contexts."""
    if device.type != "cuda":
        return CpuPartition(initial)
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return GreenContextPartition(index, range(step, 101, step), initial)
    except RuntimeError as exc:  # torch built without them, CUDA < 12.8, an old driver
        log.warning("no green contexts (%s): the lanes share all SMs, time-sliced", exc)
        return CpuPartition(initial)
