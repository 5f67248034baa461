"""Reusable host staging buffers and the transport's per-peer counters.

Why a buffer pool: a handoff's packed payload is large (256 blocks of the default model are
180 MiB) and a fresh host allocation of that size is an ``mmap`` whose pages fault in on first
touch, which costs several times the copy itself. Sender (pack target) and receiver (receive
target) take byte buffers from here and give them back when the transfer is done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch


class BufferPool:
    """Host uint8 buffers by exact size, at most ``capacity_bytes`` kept idle (thread-safe)."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:  # [nbytes] uint8, contents undefined
        with self._lock:
            free = self._idle.get(nbytes)
            if free:
                self._idle_bytes -= nbytes
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        nbytes = buf.numel()
        with self._lock:
            if self._idle_bytes + nbytes > self._capacity:
                return
            self._idle.setdefault(nbytes, []).append(buf)
            self._idle_bytes += nbytes

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes


@dataclass(frozen=True, slots=True)
class PeerStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_sent: int = 0
    transfers_received: int = 0
    seconds_sending: float = 0.0  # wall time inside send(), connection set-up included
    seconds_receiving: float = 0.0  # wall time inside recv(), waiting for the sender included
    failures: int = 0


@dataclass(frozen=True, slots=True)
class TransportStats:
    worker_id: str
    peers: MappingProxyType[str, PeerStats]


class Counters:
    """Per-peer counters; a transfer counts once it completed, a TransferError as a failure."""

    def __init__(self, worker_id: str) -> None:
        self._worker_id = worker_id
        self._stats: dict[str, PeerStats] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> TransportStats:
        with self._lock:
            return TransportStats(self._worker_id, MappingProxyType(dict(self._stats)))

    @contextmanager
    def count(self, peer: str, *, sent: bool, error: type[BaseException]) -> Iterator:
        """``with counters.count(peer, sent=True, error=TransferError) as done: ... done(n)``."""
        t0 = time.monotonic()
        moved: list[int] = []
        try:
            yield moved.append
        except error:
            self._update(peer, failures=1)
            raise
        if moved:
            dt = time.monotonic() - t0
            if sent:
                self._update(peer, bytes_sent=moved[0], transfers_sent=1, seconds_sending=dt)
            else:
                self._update(
                    peer, bytes_received=moved[0], transfers_received=1, seconds_receiving=dt
                )

    def _update(self, peer: str, **delta: float) -> None:
        with self._lock:
            s = self._stats.get(peer, PeerStats())
            self._stats[peer] = replace(s, **{k: getattr(s, k) + v for k, v in delta.items()})
