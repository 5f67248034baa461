"""Each lane's share of the GPU's streaming multiprocessors (semi-PD's x and y, in percent).

A lane computes inside the share it last ``enter``ed. On CUDA the shares are green contexts
(``torch.cuda.green_contexts.GreenContext``), one per lane and share the split rule may pick, all
created up front with a stream each: creating one is a driver call, switching is setting the
thread's current stream. The current stream is per thread, so each lane enters its share on its
own loop thread, as a command between two steps: a switch happens at an iteration boundary and
never splits a step.

Overlap, measured from torch's source (``aten/src/ATen/cuda/CUDAGreenContext.cpp``):
``GreenContext.create(num_sms=n)`` splits the whole device and keeps the first ``n`` SMs, so
two green contexts overlap on the lowest-numbered SMs. A share is therefore a cap on the SMs a
lane may use (as an MPS active-thread percentage is, and semi-PD's x + y may exceed 100), not
a disjoint slice: with (x, y) = (40, 60) the decode lane's SMs include all of prefill's.
Disjoint slices need the driver's multi-group split (``cuDevSmResourceSplitByCount`` with
two groups), which torch does not expose.

Each lane computes on a stream of its own green context, also at equal shares
(``GreenContext.Stream()``: a stream created in the context, so its kernels run on the
context's SMs whatever context the thread has current). Entering a share makes that stream the
lane thread's current torch stream; no context is pushed. Two things need the streams distinct:

* concurrency: kernels on one stream run in issue order, so lanes on one stream would queue a
  decode step behind the whole prefill step enqueued before it (4096 tokens, tens of ms);
* memory: torch's caching allocator hands a freed block to the next allocation *on the same
  stream* without waiting, since that stream's order protects it. ``set_context`` (the other
  way in) makes torch's default stream current, the same ``CUDAStream`` object for every
  green context although each context's default stream is a different queue: to the allocator
  both lanes were one stream, so a temporary one lane freed while its kernels were still queued
  could go straight to the other lane, whose kernels ran at once on their own queue: the
  likely cause of the illegal memory access a heavy prefill burst hit on the H200. With a
  stream per lane the same burst ran clean on an H100 (2026-12-06, benchmarks/README.md), and
  ``tests/gpu/test_semi_pd_gpu.py::test_lanes_never_get_each_others_freed_memory`` passed.

A torch without ``GreenContext.Stream()`` (before 2.11 or so) gets the recording partition: the
lanes share the SMs time-sliced on one stream, which is slower but safe.

On CPU there is no SM to split: ``CpuPartition`` records each lane's share, so the split rule's
decisions are observable and testable, and changes nothing else (both lanes share the cores
through the OS scheduler).
"""

from __future__ import annotations

import ctypes
import enum
import logging
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
    """One green context, and one stream in it, per lane and share in ``shares`` (percent), on
    CUDA device ``device_index``."""

    enforced = True

    def __init__(
        self,
        device_index: int,
        shares: Iterable[int],
        initial: Split,
        decode_first: bool = False,
    ) -> None:
        """``decode_first``: the decode lane's streams at the device's highest CUDA stream
        priority, the prefill lane's at the lowest (the block scheduler dispatches a
        higher-priority stream's waiting blocks first as SMs free up); False: torch's
        green-context streams, all at the default priority. Experimental: on an H100 it did not
        shorten the decode lane's wait behind queued prefill GEMMs (tests/gpu/test_semi_pd_gpu.py,
        test_decode_first_streams_cut_the_decode_lanes_wait, xfail)."""
        from torch.cuda.green_contexts import GreenContext

        if not callable(getattr(GreenContext, "Stream", None)):
            raise RuntimeError("this torch's GreenContext has no Stream()")
        self.device_index = device_index
        self.total_sms = torch.cuda.get_device_properties(device_index).multi_processor_count
        wanted = sorted({*shares, initial.prefill, initial.decode})
        self.num_sms = {s: max(1, round(self.total_sms * s / 100)) for s in wanted}
        self._contexts: dict[tuple[Lane, int], Any] = {
            (lane, s): GreenContext.create(num_sms=n, device_id=device_index)
            for lane in Lane
            for s, n in self.num_sms.items()
        }
        self._streams = {
            (lane, s): _stream_of(
                ctx, device_index, (lane is Lane.DECODE) if decode_first else None
            )
            for (lane, s), ctx in self._contexts.items()
        }
        self._shares = {lane: initial.share(lane) for lane in Lane}

    def stream(self, lane: Lane, share: int) -> Any:
        return self._streams[lane, share]

    def shares(self) -> list[int]:
        """Every share a lane can enter (percent, ascending)."""
        return sorted(self.num_sms)

    def enter(self, lane: Lane, share: int) -> None:
        new = self._streams.get((lane, share))
        if new is None:
            raise ValueError(f"no green context for a {share}% share; have {sorted(self.num_sms)}")
        old = torch.cuda.current_stream(self.device_index)
        new.wait_stream(old)  # what the lane queued before the switch comes first
        torch.cuda.set_stream(new)  # this thread's current stream: the lane's thread
        self._shares[lane] = share

    def share(self, lane: Lane) -> int:
        return self._shares[lane]

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device_index).synchronize()


def _stream_of(ctx: Any, device_index: int, first: bool | None) -> Any:
    """The green context's stream. Made with the context current, as some torch releases
    create it in whatever context is current; the calling thread's context and current stream
    are restored after. ``first`` not None: a non-blocking stream the driver creates in the
    context at its highest (True) or lowest (False) priority (torch's ``GreenContext.Stream()``
    takes none), handed to torch as an ``ExternalStream`` that lives as long as the process."""
    ctx.set_context()
    try:
        if first is None:
            return ctx.Stream()
        cuda = ctypes.CDLL("libcuda.so.1")
        least, greatest = ctypes.c_int(), ctypes.c_int()
        _check(cuda.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest)))
        handle = ctypes.c_void_p()
        priority = greatest if first else least
        _check(
            cuda.cuStreamCreateWithPriority(ctypes.byref(handle), CU_STREAM_NON_BLOCKING, priority)
        )
        return torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", device_index))
    finally:
        ctx.pop_context()


CU_STREAM_NON_BLOCKING = ctypes.c_uint(1)


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"CUDA driver call returned CUresult {rc}")


def build_partition(
    device: torch.device, initial: Split, step: int, decode_first: bool = False
) -> SMPartition:
    """Green contexts on CUDA for every multiple of ``step`` percent (the split rule moves in
    ``step``s) plus the initial shares; the recording partition on CPU, or (with a warning) on
    a GPU whose torch, driver or CUDA version has no green contexts."""
    if device.type != "cuda":
        return CpuPartition(initial)
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return GreenContextPartition(index, range(step, 101, step), initial, decode_first)
    except (
        RuntimeError,
        OSError,
    ) as exc:  # torch without them or their streams, CUDA < 12.8, old driver
        log.warning("no green-context streams (%s): the lanes share all SMs, time-sliced", exc)
        return CpuPartition(initial)
