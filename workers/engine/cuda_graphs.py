"""CUDA graphs for pure decode steps: the model's forward plus ``compute_logits``, captured once
per (batch size, block-table width) bucket and replayed with no Python per layer and no host
synchronisation.

Static inputs, on the device::

    i64 [4, even(max_batch)]    input_ids | positions | slot_mapping (-1 on padding rows) |
                                context_lens (0 on padding rows): one host→device copy a step;
                                the last row holds the contexts as int32 (its first half), the
                                dtype an eager step gives them (runner.prepare_inputs), so that
                                a graph's capture compiles the very kernels an eager decode step
                                launches (Triton compiles again for another argument dtype: an
                                eager step past the largest bucket compiled the decode kernel
                                for 500 ms mid-serving on the 2026-12-07 H200)
    i32 [max_batch * W_max]     block tables, viewed as [max_batch, W] for a bucket of width W

Block tables change rarely (a sequence gains a block every ``block_size`` tokens), and
re-sending ``[B, W]`` every step costs more host time than the whole step at batch 128, so the
block list each row was last sent from is remembered, with its length, and only changed rows go
up (a pinned upload + ``index_copy_``). A row is unchanged while it is fed the same list object
at the same length, as in workers/engine/block_tables.py: a sequence's ``block_ids`` only grows
in place and is replaced whenever blocks are given back (finish, preemption, swap, handoff), so
no comparison of the ids themselves is needed (``stale_rows``).

A graph for batch size ``b`` reads the first ``b`` entries of each row and a ``[b, W]`` view of
the tables; rows past the live batch are padding: slot -1 (no KV write), context 0 (the decode
kernel writes zeros for them), token 0 at position 0. The Triton decode kernel derives its grid
and split-K partitioning from the table's width (never from values), so a bucket's width is
part of the captured shape: widths grow by 4x from 16 blocks up to the model's context, and a
step takes the smallest width holding its longest table, which keeps split-K close to what an
eager step of that length would choose (a table padded to the full 128k context would give one
partition per KV head to a 1k-token sequence).

Graphs share one memory pool and are captured largest first. The graphs of one batch size write
their logits into one fp32 ``[size, vocab]`` buffer, whatever their width or set: valid until a
graph of that size is replayed again (a step's logits are sampled before the next step). A
buffer per graph cost ``widths x sets`` times as much: with batches up to 256 and a 128k
vocabulary ~1 GB a set, and a semi-PD decode lane keeps a set per SM share it visits.

Sparse decode (opt-in, workers/model/sparse_attention.py) is captured the same way: the static
metadata carries the SparseAttention, whose layers run their ``static_step`` form (select on the
static tensors, fold the step's keys into the key bounds at the last layer, add the selected
tokens to a device accumulator), so a replay has no Python per layer. The caller replays only
steps the SparseAttention calls ``capturable`` (no fresh rows); the rest run eagerly. A bucket
has a graph that selects and, with ``reuse_steps`` > 1, one that reuses the selection the first
left in its static tensors (only after that graph made it: a reusing step whose tables outgrew
the bucket runs eagerly). Before a replay the keys an eager step left unfolded are folded (one
launch), after it the host takes its counters.

Other threads of the worker use the same GPU (the KV transport packing or receiving blocks, the
swap thread, a semi-PD worker's other lane): a capture runs in ``thread_local`` error mode and
inside ``GPU_GATE.capture()``, which waits for their work sections to end and holds new ones off
(workers/gpu_gate.py: another thread's allocation can invalidate a capture even so). A capture
that fails anyway is not fatal: that bucket runs eagerly and is tried again later
(``MAX_CAPTURE_FAILURES`` times at most).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
import torch

from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.model.llama import AttentionMetadata, LlamaModel
from kvrelay.workers.model.sparse_attention import CapturedStep, SparseAttention

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_CAPTURE_FAILURES = 3
MIN_WIDTH_BLOCKS = 16
WIDTH_GROWTH = 4


def capture_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in BATCH_SIZES if b < max_batch]
    return (*sizes, max_batch)


def width_buckets(max_blocks: int) -> tuple[int, ...]:
    """Block-table widths (blocks): 16, 64, 256, ... below ``max_blocks``, then ``max_blocks``."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    widths = []
    w = MIN_WIDTH_BLOCKS
    while w < max_blocks:
        widths.append(w)
        w *= WIDTH_GROWTH
    return (*widths, max_blocks)


def stale_rows(
    tables: Sequence[Sequence[int]], sent: list[Sequence[int] | None], lens: list[int]
) -> list[int]:
    """Rows of ``tables`` whose device row is out of date, then recorded as sent: row ``i`` was
    last written from ``sent[i]`` (held, so its id is not reused) when it had ``lens[i]``
    entries, and is current while ``tables[i]`` is that object at that length. Exact for lists
    that only ever grow in place (see the module doc). ``sent`` and ``lens`` are at least as long
    as ``tables``."""
    changed = [i for i, t in enumerate(tables) if t is not sent[i] or len(t) != lens[i]]
    for i in changed:
        sent[i] = table = tables[i]
        lens[i] = len(table)
    return changed


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """One decode step's rows, host side: row i feeds ``input_ids[i]`` at ``positions[i]``."""

    input_ids: Sequence[int]
    positions: Sequence[int]  # context_lens[i] == positions[i] + 1
    slots: Sequence[int]
    block_tables: Sequence[Sequence[int]]
    # (rows, ids) on the device: these rows' input ids are still on the device (the overlapped
    # engine's previous step); ``input_ids`` holds placeholders there
    device_ids: tuple[torch.Tensor, torch.Tensor] | None = None


class Replay(NamedTuple):
    """A replayed bucket: its logits rows for the live batch and the static inputs it read."""

    logits: torch.Tensor  # [n, vocab] fp32, a view of the graph's output
    input_ids: torch.Tensor  # [n] views of the static buffers
    positions: torch.Tensor
    attn: AttentionMetadata  # the bucket's [size]-row metadata (padding rows included)


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [size, vocab]
    input_ids: torch.Tensor  # [size]
    positions: torch.Tensor
    attn: AttentionMetadata
    sparse: CapturedStep | None  # what a sparse step left in static tensors


@dataclass(slots=True)
class _GraphSet:
    graphs: dict[tuple[int, int], _Graph]
    # sparse steps reusing the selection the bucket's graph in ``graphs`` made
    reuse_graphs: dict[tuple[int, int], _Graph]
    # bucket (+ (1,) for a reusing graph) -> failed captures
    capture_failures: dict[tuple[int, ...], int]


T = TypeVar("T")


def capture_graph(
    fn: Callable[[], T],
    device: torch.device,
    pool: _POOL_HANDLE | None,
    stream: torch.cuda.Stream | None,
) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` run once eagerly on ``stream`` (None: a fresh side stream), so Triton compiles and
    cuBLAS picks its kernels outside the capture, then captured on ``stream`` (None: torch's
    side stream) into a graph of memory pool ``pool``, inside ``GPU_GATE.capture()`` in
    ``thread_local`` error mode: (the graph, what the captured call returned). A graph keeps to
    the SMs of the stream it was captured on (a semi-PD lane's green-context share)."""
    current = torch.cuda.current_stream(device)
    warm = stream or torch.cuda.Stream(device)
    warm.wait_stream(current)
    with torch.cuda.stream(warm):
        fn()
    current.wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with (
        GPU_GATE.capture(),
        torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
    ):
        out = fn()
    return graph, out


class DecodeGraphs:
    """Decode-step graphs of one model and KV cache, captured lazily per bucket (or up front
    with :meth:`capture_all`). ``run`` returns None when a batch fits no bucket."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D] on CUDA
        *,
        max_batch: int = BATCH_SIZES[-1],
        max_blocks: int,
        sparse: SparseAttention | None = None,  # sparse decode; None: dense attention
    ) -> None:
        if not kv_cache.is_cuda:
            raise ValueError("CUDA graphs need a CUDA KV cache")
        self.model, self.kv_cache, self.sparse = model, kv_cache, sparse
        self.device = kv_cache.device
        self.sizes = capture_sizes(max_batch)
        self.widths = width_buckets(max_blocks)
        self.max_batch, self.max_blocks = self.sizes[-1], self.widths[-1]
        b, w = self.max_batch, self.max_blocks
        # an even row length keeps the int32 contexts row at a 16-byte aligned start, as an
        # eager step's (Triton also specializes on a pointer's alignment)
        self._i64 = torch.zeros((4, b + b % 2), dtype=torch.int64, device=self.device)
        self._tables = torch.zeros(b * w, dtype=torch.int32, device=self.device)
        # the block lists the device's table rows were written from and their lengths then, as
        # laid out for width ``_sent_width`` (``stale_rows``; None: written from no list)
        self._sent: list[Sequence[int] | None] = [None] * b
        self._sent_lens = [0] * b
        self._sent_width = 0
        self._pool = torch.cuda.graph_pool_handle()
        self._logits: dict[int, torch.Tensor] = {}  # per batch size, every width and set
        self._sets: dict[Hashable, _GraphSet] = {}
        self.row_ids = torch.arange(b, device=self.device)  # [max_batch] int64, for callers
        self.replays = 0
        self.use_set(None, None)

    def use_set(self, key: Hashable, stream: torch.cuda.Stream | None) -> None:
        """Capture into and replay from graph set ``key`` from now on, capturing on ``stream``
        (None: a private side stream of torch's). A semi-PD decode lane keeps one set per SM
        share, captured on that share's green-context stream: a graph captured elsewhere runs
        on every SM whatever stream replays it (tests/gpu/test_semi_pd_gpu.py)."""
        graph_set = self._sets.get(key)
        if graph_set is None:
            graph_set = self._sets[key] = _GraphSet({}, {}, {})
        self._graphs, self._reuse_graphs = graph_set.graphs, graph_set.reuse_graphs
        self.capture_failures = graph_set.capture_failures
        self._capture_stream = stream
        self.set_key = key

    # ---- capture --------------------------------------------------------------------------
    def _table_view(self, rows: int, width: int) -> torch.Tensor:
        return self._tables[: rows * width].view(rows, width)

    @property
    def _contexts(self) -> torch.Tensor:
        """``[max_batch]`` int32: the first half of the last row."""
        return self._i64[3].view(torch.int32)[: self.max_batch]

    def _views(self, size: int, width: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        attn = AttentionMetadata(
            slot_mapping=self._i64[2, :size],
            block_tables=self._table_view(size, width),
            context_lens=self._contexts[:size],
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            is_decode=True,
            sparse=self.sparse,
        )
        return self._i64[0, :size], self._i64[1, :size], attn

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        reuses: CapturedStep | None,
        logits: torch.Tensor,
    ) -> tuple[torch.Tensor, CapturedStep | None]:
        if self.sparse is None:
            hidden = self.model(input_ids, positions, self.kv_cache, attn)
            return self.model.compute_logits(hidden, out=logits), None
        with self.sparse.static_step(reuses) as captured:
            hidden = self.model(input_ids, positions, self.kv_cache, attn)
        return self.model.compute_logits(hidden, out=logits), captured

    def _logits_of(self, size: int) -> torch.Tensor:
        """The logits buffer of batch size ``size`` (module docstring), made on first use."""
        out = self._logits.get(size)
        if out is None:
            vocab = self.model.config.vocab_size
            out = self._logits[size] = torch.empty(
                (size, vocab), dtype=torch.float32, device=self.device
            )
        return out

    @torch.inference_mode()
    def capture(self, size: int, width: int, reuse: bool = False) -> None:
        """``reuse``: the sparse step that reads the picks of the bucket's selecting graph
        (captured first)."""
        if size not in self.sizes or width not in self.widths:
            raise ValueError(f"no bucket ({size}, {width}) in {self.sizes} x {self.widths}")
        graphs = self._reuse_graphs if reuse else self._graphs
        if (size, width) in graphs:
            return
        reuses = None
        if reuse:
            selecting = self._graphs.get((size, width))
            if selecting is None or selecting.sparse is None:
                raise ValueError(f"bucket ({size}, {width}) has no selecting sparse graph")
            reuses = selecting.sparse
        # Padding everywhere: no KV write, context 0 (a sparse step's warm-up folds no key and
        # counts no token). Warm up on a side stream first so Triton compiles and cuBLAS picks
        # its kernels outside the capture.
        self._i64.zero_()
        self._i64[2].fill_(-1)
        self._tables.zero_()
        self._sent = [None] * self.max_batch
        ids, pos, attn = self._views(size, width)
        out = self._logits_of(size)
        graph, (logits, captured) = capture_graph(
            lambda: self._forward(ids, pos, attn, reuses, out), self.device, self._pool,
            self._capture_stream,
        )  # fmt: skip
        graphs[(size, width)] = _Graph(graph, logits, ids, pos, attn, captured)

    def capture_all(self, max_width: int | None = None, max_batch: int | None = None) -> int:
        """Capture every bucket up to ``max_width`` blocks and the bucket holding ``max_batch``
        rows (largest first); returns the count."""
        widths = [w for w in self.widths if max_width is None or w <= max_width]
        top = None if max_batch is None else _bucket(max_batch, self.sizes)
        for size in reversed([s for s in self.sizes if top is None or s <= top]):
            for width in reversed(widths):
                self.capture(size, width)
        return len(self._graphs)

    @property
    def num_graphs(self) -> int:
        """Graphs captured, in every set."""
        return sum(len(g.graphs) + len(g.reuse_graphs) for g in self._sets.values())

    # ---- replay ---------------------------------------------------------------------------
    def bucket(self, batch: int, blocks: int) -> tuple[int, int] | None:
        size, width = _bucket(batch, self.sizes), _bucket(blocks, self.widths)
        return None if size is None or width is None else (size, width)

    def run(self, batch: DecodeBatch) -> Replay | None:
        """fp32 logits ``[n, vocab]`` of the n rows (a view of the graph's output, valid until
        the same bucket runs again), or None when the batch fits no bucket (or its capture
        failed, or a sparse step reuses picks another bucket's graph made): run it eagerly."""
        n = len(batch.input_ids)
        if n == 0:
            return None
        blocks = max(len(t) for t in batch.block_tables)
        key = self.bucket(n, blocks)
        if key is None:
            return None
        size, width = key
        reuses = None if self.sparse is None else self.sparse.reused_picks()
        graphs: dict[tuple[int, int], _Graph] = self._graphs
        failed: tuple[int, ...] = key
        if reuses is not None:
            selecting = self._graphs.get(key)
            if selecting is None or selecting.sparse is not reuses:
                return None  # the picks are another bucket's: the tables outgrew it
            graphs, failed = self._reuse_graphs, (*key, 1)
        if key not in graphs:
            if self.capture_failures.get(failed, 0) >= MAX_CAPTURE_FAILURES:
                return None
            try:
                self.capture(size, width, reuse=reuses is not None)
            except RuntimeError as exc:  # torch.AcceleratorError is one: run eagerly instead
                self.capture_failures[failed] = self.capture_failures.get(failed, 0) + 1
                log.warning("CUDA graph capture of bucket %s failed (%d): %s; running eagerly",
                            failed, self.capture_failures[failed], exc)  # fmt: skip
                return None
        graph = graphs[key]
        self._stage(batch, size, width)
        if self.sparse is not None:
            self.sparse.fold_pending(self.kv_cache)
        graph.graph.replay()
        if graph.sparse is not None:
            assert self.sparse is not None
            self.sparse.replayed(graph.sparse, n)
        self.replays += 1
        return Replay(graph.logits[:n], graph.input_ids[:n], graph.positions[:n], graph.attn)

    def _stage(self, batch: DecodeBatch, size: int, width: int) -> None:
        """Enqueue the bucket's inputs: one pinned non-blocking copy of ids / positions / slots
        / contexts, and the changed table rows. Staging tensors come fresh from the caching
        host allocator, which hands a block out again only once the copy reading it has run, so
        nothing here waits on the device."""
        n, b = len(batch.input_ids), self.max_batch
        host = torch.empty(self._i64.shape, dtype=torch.int64, pin_memory=True)
        rows = host.numpy()
        rows[0, :n] = batch.input_ids
        rows[1, :n] = batch.positions
        rows[2, :n] = batch.slots
        rows[:3, n:] = 0
        rows[2, n:] = -1  # padding rows: no KV write, context 0 (the kernel writes zeros)
        rows[3] = 0
        rows[3].view(np.int32)[:n] = rows[1, :n] + 1  # int32 contexts (``_contexts``)
        self._i64.copy_(host, non_blocking=True)
        if batch.device_ids is not None:
            self._i64[0].index_copy_(0, *batch.device_ids)
        if width != self._sent_width:
            self._sent = [None] * b
            self._sent_width = width
        changed = stale_rows(batch.block_tables, self._sent, self._sent_lens)
        if not changed:
            return
        host_rows = torch.zeros((len(changed), width), dtype=torch.int32, pin_memory=True)
        staged = host_rows.numpy()
        for k, i in enumerate(changed):
            table = batch.block_tables[i]
            staged[k, : len(table)] = table
        index = torch.tensor(changed, dtype=torch.int64, pin_memory=True)
        self._table_view(b, width).index_copy_(
            0,
            index.to(self.device, non_blocking=True),
            host_rows.to(self.device, non_blocking=True),
        )
