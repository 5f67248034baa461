"""The CPU tier behind an engine's device pool, and the block copies between the tiers.

Two pools over two caches of one block shape ``[n, L, 2, bs, Hkv, D]``: the device pool over
``kv_cache`` and a CPU pool (``Tier.CPU``) over a host tensor (pinned when the device is CUDA;
on CPU-only engines both are host memory, same code path and accounting). Both pools write
one shared KVEvent log, so a tier move reads REMOVED in one tier and STORED in the other.

* **Demote**: the device pool calls ``demote`` with the hashed blocks it is about to reuse;
  their KV is copied (one grouped copy) into CPU blocks that take the hashes, before
  ``allocate`` returns. A hash already valid in CPU is not copied again. CPU eviction is LRU
  and drops.
* **Promote**: after the device prefix hits, ``cpu_hits`` finds the chain's following blocks in
  CPU; ``promote`` copies them into new device blocks (the CPU copy stays cached).
* Swapping a request out and in (``workers/engine/swap.py``) uses the same pools and copier.

A copy moves n blocks with one ``copy_blocks`` call (one gather + one scatter), never n small
ones. ``BlockCopier.copy`` runs it inline (CPU engines, or ``async_copies=False``: done when it
returns) or on one background thread (CUDA: on its own stream) so the running batch overlaps
the transfer; its handle is ``done()`` once the destination holds the data. The caller owns
the ordering: source blocks stay referenced (not reused) and destination blocks are not read
until the handle is done (FastSwitch's per-request event, no global barrier). ``copy_now`` is
synchronous (demotion: the evicted device blocks are reused at once), except a demotion inside
an engine's schedule (``CpuTier.stream_ordered``; ``KVRELAY_STREAM_DEMOTION=0`` turns it off):
queued on the engine's stream, which is the reused blocks' next writer, and ordered before
every later use of the host cache by events.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from kvrelay.kernels import copy_blocks
from kvrelay.workers.device_upload import host_to_device
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.types import Tier

# an engine's schedule demotes evicted blocks stream-ordered (``CpuTier.stream_ordered``) unless
# KVRELAY_STREAM_DEMOTION=0 (read once at import: ``EngineConfig.stream_demotion``'s default).
# Measured on an H100 (benchmarks/README.md, twelfth session): a synchronous demotion held an
# overlapped engine's schedule 5.8 / 24.7 ms p50 / p99 waiting for the step in flight (0.56 /
# 6.9 ordered); served goodput of one colocated worker rose from 112 to >= 128 req/s, of the
# overlapped semi-PD worker from 96 to 112
STREAM_DEMOTION = os.environ.get("KVRELAY_STREAM_DEMOTION", "1") != "0"


class CopyHandle:
    """A copy in flight (or finished); its result is how long the copy itself took."""

    __slots__ = ("_future", "_seconds")

    def __init__(self, future: Future[float] | None = None, seconds: float = 0.0) -> None:
        self._future = future
        self._seconds = seconds

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> float:
        """Seconds the copy ran (not counting its wait for the compute stream); 0: nothing
        was copied."""
        if self._future is not None:
            return self._future.result()  # re-raises a failed copy
        return self._seconds


DONE = CopyHandle()


def block_nbytes(cache: torch.Tensor) -> int:
    """Bytes of one block of a ``[num_blocks, L, 2, bs, Hkv, D]`` cache."""
    return cache[0].numel() * cache.element_size()


class BlockCopier:
    def __init__(self, device: torch.device, *, async_copies: bool) -> None:
        self._threads = (
            ThreadPoolExecutor(1, thread_name_prefix="kv-swap") if async_copies else None
        )
        self._stream = (
            torch.cuda.Stream(device) if async_copies and device.type == "cuda" else None
        )
        self.copies = 0  # copy_blocks calls (one per request per direction)
        self.bytes = 0

    @property
    def is_async(self) -> bool:
        return self._threads is not None

    def copy_now(
        self,
        src: torch.Tensor,
        src_ids: Sequence[int],
        dst: torch.Tensor,
        dst_ids: Sequence[int],
        *,
        wait: bool = True,
    ) -> None:
        """The copy, done when this returns. ``wait`` False: nothing here waits for the
        current stream — a copy into pinned host memory is only queued on it
        (``kvrelay.kernels.copy_blocks``), and the block ids go to the device through pinned
        memory (a pageable upload waits for every kernel queued before it)."""
        if src_ids:
            self._count(src, src_ids)
            src_ids, dst_ids = host_order(src, src_ids, dst, dst_ids)
            if wait:
                copy_blocks(src, _ids(src_ids), dst, _ids(dst_ids))
                return
            src_at = host_to_device(src_ids, torch.long, src.device)
            dst_at = host_to_device(dst_ids, torch.long, dst.device)
            copy_blocks(src, src_at, dst, dst_at, wait=False)

    def copy(
        self, src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]
    ) -> CopyHandle:
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"copy of {len(src_ids)} blocks into {len(dst_ids)}")
        if not src_ids:
            return DONE
        if self._threads is None:
            t0 = time.perf_counter()
            self.copy_now(src, src_ids, dst, dst_ids)
            return CopyHandle(seconds=time.perf_counter() - t0)
        self._count(src, src_ids)
        src_ids, dst_ids = host_order(src, src_ids, dst, dst_ids)
        ready = None
        if self._stream is not None:
            # the side stream must see every write the main stream queued to the source blocks
            ready = torch.cuda.Event()
            ready.record()
        return CopyHandle(
            self._threads.submit(self._run, src, _ids(src_ids), dst, _ids(dst_ids), ready)
        )

    def _run(
        self,
        src: torch.Tensor,
        src_ids: torch.Tensor,
        dst: torch.Tensor,
        dst_ids: torch.Tensor,
        ready: torch.cuda.Event | None,
    ) -> float:
        with torch.inference_mode(), GPU_GATE.work():
            if self._stream is None:
                t0 = time.perf_counter()
                copy_blocks(src, src_ids, dst, dst_ids)
                return time.perf_counter() - t0
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._stream):
                assert ready is not None
                self._stream.wait_event(ready)
                start.record()  # after the wait: the copy's own time, not the batch's
                copy_blocks(src, src_ids, dst, dst_ids)
                end.record()
            self._stream.synchronize()  # done() means the destination holds the data
            return start.elapsed_time(end) / 1e3

    def _count(self, src: torch.Tensor, src_ids: Sequence[int]) -> None:
        self.copies += 1
        self.bytes += len(src_ids) * block_nbytes(src)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)


def host_order(
    src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]
) -> tuple[Sequence[int], Sequence[int]]:
    """The pairs of a copy between the device and the host, sorted by their host-side block
    ids: ``copy_blocks`` moves the host side in runs of consecutive ids, one copy call each
    (and a CUDA call lets the other semi-PD lane take the GIL). The pairs are the same, so the
    copy is; a pool's LRU hands blocks out in any order (descending after a tail-first
    release), which made a 256-block demotion 256 copies."""
    host = dst_ids if dst.device.type == "cpu" else src_ids if src.device.type == "cpu" else None
    if host is None or src.device == dst.device:
        return src_ids, dst_ids
    order = sorted(range(len(host)), key=host.__getitem__)
    return [src_ids[i] for i in order], [dst_ids[i] for i in order]


def _ids(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.long)


class CpuTier:
    def __init__(
        self,
        device_cache: torch.Tensor,
        device_pool: BlockPool,
        num_blocks: int,
        copier: BlockCopier,
    ) -> None:
        shape = (num_blocks, *device_cache.shape[1:])
        self.cache = torch.empty(
            shape, dtype=device_cache.dtype, pin_memory=device_cache.is_cuda
        )
        self.device_cache = device_cache
        self.device_pool = device_pool
        self.pool = BlockPool(
            num_blocks, device_pool.block_size, tier=Tier.CPU, events=device_pool.event_log
        )
        self.copier = copier
        self.block_bytes = block_nbytes(device_cache)
        device_pool.on_evict = self.demote
        self.demoted_blocks = 0
        self.promoted_blocks = 0
        self.demotions_dropped = 0  # evicted device blocks the CPU pool had no room for
        # stream-ordered demotion (``stream_ordered``): copies into the host cache queued, not
        # waited for; per CPU block, the event after the last queued copy into or out of it,
        # until seen done (per block: the other semi-PD lane's copies, queued behind its step,
        # hold up only what touches the same blocks)
        # per thread: the mode is the lock holder's, and a semi-PD prefill lane may hand the
        # storage lock to the decode lane inside its schedule (workers/semi_pd/lanes.py)
        self._mode = threading.local()
        self._pending: dict[int, torch.cuda.Event] = {}
        self.ordered_demotions = 0
        self.order_waits = 0  # stream waits queued for pending copies (``order_after_pending``)

    @contextmanager
    def stream_ordered(self) -> Iterator[None]:
        """Demotions inside only queue their device-to-host copy on the current stream (CUDA,
        pinned host cache): the host does not wait for it, nor for the step still running on
        that stream ahead of it — a synchronous demotion waited for both, under a semi-PD
        worker's storage lock (benchmarks/README.md, eleventh session). Safe where every later
        writer of the evicted device blocks is on the same stream (an engine's own steps,
        promotions, its swaps' copies, which wait for the current stream): the engine's
        ``schedule``. Every reader or writer of the host cache orders itself after the pending
        copies first (``order_after_pending``)."""
        before, self._mode.ordered = self._ordered, self.cache.is_pinned()
        try:
            yield
        finally:
            self._mode.ordered = before

    @property
    def _ordered(self) -> bool:
        """This thread is inside ``stream_ordered``."""
        return bool(getattr(self._mode, "ordered", False))

    def order_after_pending(
        self, cpu_blocks: Iterable[int], stream: torch.cuda.Stream | None = None
    ) -> None:
        """``stream`` (default: the current one) waits (on the device, not the host) for the
        queued copies into or out of ``cpu_blocks`` not yet seen done."""
        if not self._pending:
            return
        # one query and at most one stream wait per distinct copy: a demotion's blocks share
        # one event, and each CUDA call releases the GIL, which the other semi-PD lane may then
        # hold (a wait per block made 256 calls of a 256-block reuse)
        by_event: dict[int, tuple[torch.cuda.Event, list[int]]] = {}
        for block in cpu_blocks:
            event = self._pending.get(block)
            if event is not None:
                by_event.setdefault(id(event), (event, []))[1].append(block)
        for event, blocks in by_event.values():
            if event.query():
                for block in blocks:
                    del self._pending[block]
                continue
            stream = stream or torch.cuda.current_stream(self.device_cache.device)
            stream.wait_event(event)
            self.order_waits += 1

    def _note_pending(self, cpu_blocks: Iterable[int]) -> None:
        """After a copy queued into or out of ``cpu_blocks`` on the current stream (pinned
        host cache): their next user orders itself after it."""
        if not self.cache.is_pinned():
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device_cache.device))
        for block in cpu_blocks:
            self._pending[block] = event

    # ---- demotion / promotion ----------------------------------------------------------------
    def demote(self, evicted: list[tuple[int, int]]) -> None:
        """``BlockPool.on_evict``: keep a CPU copy of hashed device blocks about to be reused."""
        src: list[int] = []
        hashes: list[int] = []
        for block, h in evicted:
            hit = self.pool.lookup([h])
            if hit:  # already valid in CPU: refresh its LRU position only
                self.pool.acquire(hit)
                self.pool.release(hit)
            else:
                src.append(block)
                hashes.append(h)
        room = min(len(src), self.pool.num_available)
        self.demotions_dropped += len(src) - room
        if room == 0:
            return
        src, hashes = src[:room], hashes[:room]
        dst = self.pool.allocate(room)
        self.order_after_pending(dst)  # reused CPU blocks: a copy may still read or write them
        self.copier.copy_now(self.device_cache, src, self.cache, dst, wait=not self._ordered)
        if self._ordered:
            self._note_pending(dst)
            self.ordered_demotions += 1
        for block, h in zip(dst, hashes, strict=True):
            self.pool.commit(block, h)
        # in the order the device evicted them (a request's tail before its head, as its
        # blocks were released there): here too its prefix outlives its tail
        self.pool.release(dst)
        self.demoted_blocks += room

    def cpu_hits(self, hashes: Sequence[int]) -> list[int]:
        """CPU blocks holding the leading run of ``hashes`` (no reference taken)."""
        return self.pool.lookup(hashes)

    def promote(
        self, cpu_ids: Sequence[int], device_ids: Sequence[int], hashes: Sequence[int]
    ) -> None:
        """Copy CPU hits into freshly allocated (referenced) device blocks and commit their
        hashes there. The caller holds a CPU reference on ``cpu_ids`` across the device
        allocation (so a demotion cannot evict them) and releases it afterwards."""
        self.order_after_pending(cpu_ids)  # their data may still be on its way
        # inside an engine's schedule (stream-ordered) the ids' upload does not wait either
        self.copier.copy_now(self.cache, cpu_ids, self.device_cache, device_ids,
                             wait=not self._ordered)  # fmt: skip
        self._note_pending(cpu_ids)  # the read may still be queued when they are reused
        for block, h in zip(device_ids, hashes, strict=True):
            self.device_pool.commit(block, h)
        self.promoted_blocks += len(cpu_ids)

    def stats_extra(self) -> dict[str, int]:
        return {
            "ordered_demotions": self.ordered_demotions,
            "order_waits": self.order_waits,
            "demoted_blocks": self.demoted_blocks,
            "promoted_blocks": self.promoted_blocks,
            "demotions_dropped": self.demotions_dropped,
        }


def build_cpu_tier(
    device_cache: torch.Tensor,
    device_pool: BlockPool,
    *,
    num_blocks: int | None,
    kv_gb: float,
    async_copies: bool | None,
) -> tuple[BlockCopier, CpuTier | None]:
    """The copier and the CPU tier (None when it has 0 blocks) for one engine.
    ``num_blocks=None``: as many as ``kv_gb`` holds; ``async_copies=None``: on CUDA only."""
    device = device_cache.device
    copier = BlockCopier(
        device, async_copies=device.type == "cuda" if async_copies is None else async_copies
    )
    n = int(kv_gb * 2**30 // block_nbytes(device_cache)) if num_blocks is None else num_blocks
    if n < 0 or kv_gb < 0:
        raise ValueError(f"cpu_num_blocks and cpu_kv_gb must be >= 0, got {n}, {kv_gb}")
    return copier, (CpuTier(device_cache, device_pool, n, copier) if n else None)


def check_held(pool: BlockPool, held: Iterable[int]) -> None:
    """Every block requests hold is referenced at least as often as it is held."""
    for block, count in Counter(held).items():
        if pool.ref_count(block) < count:
            raise AssertionError(f"{pool.tier.value} block {block} held more often than referenced")


def check_owned(pool: BlockPool, held: Iterable[int]) -> None:
    """Exact ownership: every block is referenced exactly as often as it is held, so no block
    is owned twice (held more often than referenced) or by nobody (referenced, not held).
    ``held`` must name every holder of the pool (all engines over it, reservations)."""
    counts = Counter(held)
    for block in range(pool.num_blocks):
        ref, n = pool.ref_count(block), counts.get(block, 0)
        if n > ref:
            raise AssertionError(f"{pool.tier.value} block {block} owned twice: ref {ref}, held {n}")
        if ref > n:
            raise AssertionError(f"{pool.tier.value} block {block} owned by nobody: ref {ref}, held {n}")
