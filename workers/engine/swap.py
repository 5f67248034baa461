"""Preemption by swap: a request's KV moves to the CPU tier and back (FastSwitch-style).

``Swapper.swap_out(seq)`` copies the blocks not already valid in CPU into CPU blocks (hashed
blocks whose hash the CPU pool holds, e.g. from an earlier swap of the same conversation or a
demotion, are reused: a repeat swap-out copies only the new blocks) with one grouped copy.
``swap_in(seq)`` brings them back into device blocks (device blocks still cached under the same
hash are reused too), again one copy. Copies may be in flight (``workers/kv/tiers.py``):
the sequence holds both its device and its CPU blocks until ``land`` completes the
bookkeeping (hashes committed in the destination tier, source blocks released: hashed ones
stay cached there, ready for the next swap or a prefix hit).

    RUNNING -swap_out-> SWAPPED_OUT (in flight, then landed: waiting) -swap_in-> SWAPPING_IN
            -land-> RUNNING

Whether to swap or recompute is ``prefer_swap``: bytes to move vs tokens to recompute, at the
copy rate and the prefill rate, each measured unless configured, times the requests each
delays (an overlapped copy delays its victim only; a prefill, every running request). The
copy rate starts from a probe (a few blocks each way into scratch buffers, timed) and follows
every swap's copy time (``CopyHandle.wait``, the copy alone, not its wait for the batch), as
the prefill rate follows big steps; the rule assumed 8 GB/s before and picked swap where the
copies ran far slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kvrelay.kernels import copy_blocks
from kvrelay.workers.engine.rates import copy_rate, running_average
from kvrelay.workers.engine.sequence import SeqStatus, Sequence
from kvrelay.workers.kv.tiers import CopyHandle, CpuTier

PREEMPTION_MODES = ("auto", "swap", "recompute")
PROBE_BLOCKS = 8


def prefer_swap(
    copy_bytes: int,
    recompute_tokens: int,
    bytes_per_s: float,
    tokens_per_s: float,
    delayed: int = 1,
) -> bool:
    """Swap when moving ``copy_bytes`` out and back delays requests less than recomputing
    ``recompute_tokens`` of prefill. Both rates are positive (config or measured).

    ``delayed``: the requests a recompute delays for each one a swap delays. 1 when copies run
    inline (they stall the batch as the prefill does); with copies overlapped with compute the
    round trip delays only its victim, while the prefill runs in the steps of every running
    request, so the caller passes the batch."""
    return 2 * copy_bytes / bytes_per_s <= delayed * recompute_tokens / tokens_per_s


@dataclass(frozen=True, slots=True)
class SwapPlan:
    """One request's blocks in flight between tiers."""

    handle: CopyHandle
    nbytes: int  # what the copy moves
    hashes: tuple[tuple[int, int], ...]  # (destination block, hash) committed when done
    release: tuple[int, ...]  # source-tier blocks released when done (tail first)


def probe_copy_rate(tier: CpuTier) -> float:
    """Bytes/s of copying a few blocks device -> host and host -> device, into scratch
    buffers (no cache is written: another engine may share the pool). Timed on the second of
    two rounds (the first warms up)."""
    n = min(PROBE_BLOCKS, tier.device_cache.shape[0], tier.cache.shape[0])
    ids = torch.arange(n)
    shape = (n, *tier.cache.shape[1:])
    host = torch.empty(shape, dtype=tier.cache.dtype, pin_memory=tier.cache.is_pinned())
    dev = torch.empty(shape, dtype=tier.cache.dtype, device=tier.device_cache.device)
    cuda = tier.device_cache.is_cuda
    seconds = 0.0
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize(tier.device_cache.device)
        t0 = time.perf_counter()
        copy_blocks(tier.device_cache, ids, host, ids)
        copy_blocks(tier.cache, ids, dev, ids)
        if cuda:
            torch.cuda.synchronize(tier.device_cache.device)
        seconds = time.perf_counter() - t0
    return 2 * n * tier.block_bytes / max(seconds, 1e-9)


class Swapper:
    def __init__(
        self,
        tier: CpuTier,
        *,
        mode: str,
        bytes_per_s: float | None,
        tokens_per_s: float,
        release_device: Callable[[Iterable[int]], None] | None = None,
    ) -> None:
        """``bytes_per_s``: the copy rate the rule uses; None: measured (probe, then swaps).
        ``release_device``: how a landed swap-out gives its device blocks back (the engine's
        deferred release, workers/engine/deferred.py); None: ``device_pool.release``."""
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode {mode!r} not in {PREEMPTION_MODES}")
        if (bytes_per_s is not None and bytes_per_s <= 0) or tokens_per_s <= 0:
            raise ValueError("swap and recompute rates must be positive")
        self.tier = tier
        self.mode = mode
        self.release_device = release_device or tier.device_pool.release
        self.measure_copies = bytes_per_s is None
        self.bytes_per_s = probe_copy_rate(tier) if bytes_per_s is None else bytes_per_s
        self.tokens_per_s = tokens_per_s  # the engine keeps it measured
        self.in_flight: dict[str, tuple[Sequence, SwapPlan]] = {}
        self.swaps_out = 0
        self.swaps_in = 0
        self.swap_bytes = 0  # both directions

    # ---- out -------------------------------------------------------------------------------
    def _cpu_hit(self, block: int) -> int | None:
        h = self.tier.device_pool.block_hash(block)
        hit = self.tier.pool.lookup([h]) if h is not None else []
        return hit[0] if hit else None

    def swap_out(self, seq: Sequence, running: int = 0) -> bool:
        """Swap a running sequence (already off the running queue) out, if the mode and the
        cost rule say so and the CPU pool has room; False: the caller recomputes.
        ``running``: the sequences still running, whose steps a recompute would delay."""
        if self.mode == "recompute" or not seq.block_ids:
            return False
        pool = self.tier.pool
        hits = [self._cpu_hit(b) for b in seq.block_ids]
        copy = sum(h is None for h in hits)
        revived = sum(1 for h in hits if h is not None and pool.ref_count(h) == 0)
        delayed = running + 1 if self.tier.copier.is_async else 1
        if self.mode == "auto" and not prefer_swap(
            copy * self.tier.block_bytes,
            seq.num_computed,
            self.bytes_per_s,
            self.tokens_per_s,
            delayed,
        ):
            return False
        if not pool.can_allocate(copy + revived):
            return False  # the CPU tier is full: recompute
        pool.acquire(h for h in hits if h is not None)  # before allocating: not evictable
        fresh = iter(pool.allocate(copy))
        cpu_ids: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        hashes: list[tuple[int, int]] = []
        for block, hit in zip(seq.block_ids, hits, strict=True):
            if hit is not None:
                cpu_ids.append(hit)
                continue
            d = next(fresh)
            cpu_ids.append(d)
            src.append(block)
            dst.append(d)
            h = self.tier.device_pool.block_hash(block)
            if h is not None:
                hashes.append((d, h))
        # CPU blocks a stream-ordered demotion's copy may still write or a promotion read; the
        # copier's side stream starts after the current one (BlockCopier.copy)
        self.tier.order_after_pending(cpu_ids)
        handle = self.tier.copier.copy(self.tier.device_cache, src, self.tier.cache, dst)
        self.swap_bytes += len(src) * self.tier.block_bytes
        seq.cpu_block_ids = cpu_ids
        self.swaps_out += 1
        self.in_flight[seq.request_id] = (
            seq,
            SwapPlan(
                handle, len(src) * self.tier.block_bytes, tuple(hashes),
                tuple(reversed(seq.block_ids)),
            ),
        )
        return True

    # ---- in --------------------------------------------------------------------------------
    def swap_in(self, seq: Sequence, headroom: int = 0) -> bool:
        """Start bringing a landed swapped-out sequence back; False when the device pool
        cannot hold it now with ``headroom`` blocks to spare."""
        dev, pool = self.tier.device_pool, self.tier.pool
        hits: list[int | None] = []
        for block in seq.cpu_block_ids:
            h = pool.block_hash(block)
            hit = dev.lookup([h]) if h is not None else []
            hits.append(hit[0] if hit else None)
        need = sum(1 for h in hits if h is None or dev.ref_count(h) == 0)
        if not dev.can_allocate(need + headroom):
            return False
        dev.acquire(h for h in hits if h is not None)
        src = [c for c, hit in zip(seq.cpu_block_ids, hits, strict=True) if hit is None]
        fresh = iter(dev.allocate(len(src)))
        seq.block_ids = [hit if hit is not None else next(fresh) for hit in hits]
        dst = [d for d, hit in zip(seq.block_ids, hits, strict=True) if hit is None]
        hashes = tuple(
            (d, h) for d, c in zip(dst, src, strict=True) if (h := pool.block_hash(c)) is not None
        )
        self.tier.order_after_pending(seq.cpu_block_ids)
        handle = self.tier.copier.copy(self.tier.cache, src, self.tier.device_cache, dst)
        self.swap_bytes += len(src) * self.tier.block_bytes
        self.swaps_in += 1
        self.in_flight[seq.request_id] = (
            seq,
            SwapPlan(
                handle, len(src) * self.tier.block_bytes, hashes,
                tuple(reversed(seq.cpu_block_ids)),
            ),
        )
        return True

    # ---- completion ------------------------------------------------------------------------
    def land(self, request_id: str) -> Sequence:
        """Wait for one swap's copy and finish its bookkeeping. The sequence comes back
        SWAPPED_OUT (CPU blocks only: it waits) or RUNNING (device blocks only)."""
        seq, plan = self.in_flight.pop(request_id)
        seconds = plan.handle.wait()  # raises if the copy failed
        rate = copy_rate(plan.nbytes, seconds)
        if self.measure_copies and rate is not None:
            self.bytes_per_s = running_average(self.bytes_per_s, rate)
        if seq.status is SeqStatus.SWAPPED_OUT:
            for block, h in plan.hashes:
                self.tier.pool.commit(block, h)
            self.release_device(plan.release)  # hashed ones stay cached on device
            seq.block_ids = []
        else:
            for block, h in plan.hashes:
                self.tier.device_pool.commit(block, h)
            self.tier.pool.release(plan.release)  # hashed CPU copies stay for the next swap
            seq.cpu_block_ids = []
        return seq

    def landed(self) -> list[Sequence]:
        """Land every swap whose copy is done, in the order they started."""
        done = [rid for rid, (_, plan) in self.in_flight.items() if plan.handle.done()]
        return [self.land(rid) for rid in done]

    def freeing_blocks(self) -> int:
        """Device blocks that swap-outs in flight will release."""
        return sum(
            len(p.release) for s, p in self.in_flight.values()
            if s.status is SeqStatus.SWAPPED_OUT
        )

    def num_swapping_in(self) -> int:
        return sum(s.status is SeqStatus.SWAPPING_IN for s, _ in self.in_flight.values())
