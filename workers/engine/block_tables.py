"""Block tables that persist across steps: each sequence of a batch owns a row (a slot) of one
table, written when its blocks change, instead of a ``[B, W]`` table rebuilt from every
sequence's ``block_ids`` and uploaded whole each step.

::

    host   [rows, width] int32 (numpy)   slot s: its sequence's block ids, then 0
    device [rows, width] int32 tensor    on CPU the same memory as ``host``; elsewhere a copy
                                         patched with the changed slots' rows (one pinned
                                         non-blocking upload + ``index_copy_``, no sync)

A step's table is ``device[slots, :W]`` (one ``index_select``: rows in batch order, ``W`` the
batch's longest table), so a sequence that joins, leaves or grows a block costs one row, and a
batch that only decodes costs none. A row is unchanged while its sequence holds the same
``block_ids`` list with the same length: the scheduler grows that list in place and replaces it
whenever the blocks are given back (finish, preemption, handoff). A sequence absent from a
step gives its slot back.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from kvrelay.workers.engine.sequence import Sequence


class BlockTables:
    def __init__(self, device: torch.device, rows: int = 8, width: int = 16) -> None:
        self.device = device
        self._host = np.zeros((rows, width), dtype=np.int32)
        self._device = self._mirror(self._host)
        self._slot: dict[int, int] = {}  # id(seq) -> slot
        # per slot: its sequence (held, so ids stay unique), the ``block_ids`` list its row was
        # read from, and how many entries of that list the row holds
        self._seqs: list[Sequence | None] = [None] * rows
        self._lists: list[list[int] | None] = [None] * rows
        self._lens = [0] * rows
        self._free = list(range(rows - 1, -1, -1))  # pop() gives the lowest slot
        self.row_writes = 0  # rows (re)written, for tests and benchmarks
        self.width = 0  # the longest block table of the last batch

    def _mirror(self, host: np.ndarray) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(host)
        return torch.from_numpy(host).pin_memory().to(self.device, non_blocking=True)

    def assign(self, seqs: Seq[Sequence]) -> list[int]:
        """Slots ``[B]`` of ``seqs`` (one batch, in order, no repeats), their rows brought
        up to date on the host and patched on the device; then the slots of sequences not in
        it are freed (after, so a batch holds at most its size plus the last one's in slots)."""
        slots: list[int] = []
        dirty: list[int] = []
        widest = self.width = max((len(s.block_ids) for s in seqs), default=0)
        if widest > self._host.shape[1]:
            self._grow(self._host.shape[0], max(widest, 2 * self._host.shape[1]))
        for seq in seqs:
            s = self._slot.get(id(seq))
            if s is None:
                s = self._take(seq)
            blocks = seq.block_ids
            old, new = self._lens[s], len(blocks)
            if blocks is not self._lists[s] or new < old:
                self._host[s, :new] = blocks
                self._host[s, new:old] = 0
            elif new != old:  # grown in place: only the new entries
                self._host[s, old:new] = blocks[old:]
            else:
                slots.append(s)
                continue
            self._lists[s], self._lens[s] = blocks, new
            dirty.append(s)
            slots.append(s)
        if len(self._slot) > len(seqs):  # some sequence left the batch
            live = {id(s) for s in seqs}
            for key in self._slot.keys() - live:
                self._release(self._slot.pop(key))
        self.row_writes += len(dirty)
        if dirty and self.device.type != "cpu":
            self._upload(dirty)
        return slots

    def gather(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """``[B, width]`` int32 on the device: the rows of ``slots`` (a device tensor)."""
        return self._device[:, :width].index_select(0, slots)

    def _take(self, seq: Sequence) -> int:
        if not self._free:
            rows = self._host.shape[0]
            self._grow(2 * rows, self._host.shape[1])
        s = self._free.pop()
        self._slot[id(seq)] = s
        self._seqs[s] = seq
        return s

    def _release(self, s: int) -> None:
        self._host[s, : self._lens[s]] = 0
        self._seqs[s] = self._lists[s] = None
        self._lens[s] = 0
        self._free.append(s)
        # the device row keeps stale ids until the slot is taken again; it is never gathered
        # before then, and taking it rewrites the whole row (a new list)

    def _grow(self, rows: int, width: int) -> None:
        old_rows, old_width = self._host.shape
        host = np.zeros((rows, width), dtype=np.int32)
        host[:old_rows, :old_width] = self._host
        self._host = host
        self._device = self._mirror(host)  # a fresh full copy: every row is current
        extra = rows - old_rows
        self._seqs += [None] * extra
        self._lists += [None] * extra
        self._lens += [0] * extra
        self._free = list(range(rows - 1, old_rows - 1, -1)) + self._free

    def _upload(self, dirty: list[int]) -> None:
        staged = torch.empty((len(dirty), self._host.shape[1]), dtype=torch.int32, pin_memory=True)
        staged.numpy()[:] = self._host[dirty]
        index = torch.tensor(dirty, dtype=torch.int64, pin_memory=True)
        self._device.index_copy_(
            0,
            index.to(self.device, non_blocking=True),
            staged.to(self.device, non_blocking=True),
        )
