"""Turns a scheduler plan into model inputs, runs the model and returns the logits to sample.

The batch is packed: sequence i contributes its next ``n_i`` tokens. When every n_i is 1 the
step is a pure decode step and attention takes the decode path (one query per sequence);
otherwise every row goes through the varlen prefill path (a decode row is a chunk of one).

On CUDA a pure decode step replays a captured graph (workers/engine/cuda_graphs.py) when its
batch and longest block table fit a captured bucket (and, with sparse decode, when the
SparseAttention calls the step ``capturable``); any other step of at most
``max_prefill_tokens`` tokens and ``max_prefill_seqs`` sequences with dense attention replays a
prefill graph (workers/engine/prefill_graphs.py: one graph per token bucket, attention
included; ``KVRELAY_PREFILL_GRAPHS=0`` or ``use_prefill_graphs`` off); the rest runs eagerly.
Neither path synchronises the host: inputs go up through pinned staging buffers with
non-blocking copies, so the only sync of a step is the caller reading the sampled tokens. The
eager path's block tables persist across steps (workers/engine/block_tables.py): a row is sent
when its sequence joins or changes blocks.

The overlapped engine launches step N+1 before it has read step N's tokens: ``prev`` holds
them on the device, and a row whose input is such a token (``PLACEHOLDER`` on the host) takes it
from there with one ``index_copy_`` on the device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from kvrelay.workers.device_upload import host_to_device
from kvrelay.workers.engine.block_tables import BlockTables
from kvrelay.workers.engine.cuda_graphs import (
    BATCH_SIZES,
    DecodeBatch,
    DecodeGraphs,
)
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.prefill_graphs import MAX_SEQS, MAX_TOKENS, PrefillGraphs
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.model.llama import AttentionMetadata, LlamaModel
from kvrelay.workers.model.sparse_attention import SparseAttention

# the ``stalls`` phases (ModelRunner.stalls): steps a serving worker's streams wait longer for
EAGER_DECODE, LATE_CAPTURE = "eager_decode", "graph_capture"
R = TypeVar("R")


class DeviceTokens(NamedTuple):
    """The tokens a step sampled, still on the device: row i of ``tokens`` is ``seqs[i]``'s
    newest token (a ``PLACEHOLDER`` on the host). Matched by the object, not the request id:
    an aborted request's id may come back as a new sequence while its token is in flight (the
    holder keeps the sequences alive, so their ids stay unique)."""

    tokens: torch.Tensor  # [S] int64
    seqs: Seq[Sequence]


def _patch(
    items: Seq[ScheduledSeq], prev: DeviceTokens | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed rows, ids) for the rows whose input token is still on the device, or None."""
    if prev is None:
        return None
    seqs = prev.seqs
    if len(items) == len(seqs) and all(
        (s := it.seq) is q
        and it.num_tokens == 1
        and s.num_computed + 1 == len(s.prompt_ids) + len(s.output_ids)  # ``it.samples``
        for it, q in zip(items, seqs, strict=True)
    ):  # a steady decode batch: the same sequences in the same order, every row patched
        return torch.arange(len(items), device=device), prev.tokens
    where = {id(s): i for i, s in enumerate(seqs)}
    dst: list[int] = []
    src: list[int] = []
    end = 0
    for it in items:
        end += it.num_tokens
        row = where.get(id(it.seq))
        # only a sequence's newest token can be in flight: the chunk's last row, if it reaches it
        if row is not None and it.samples:
            dst.append(end - 1)
            src.append(row)
    if not dst:
        return None
    return (
        host_to_device(dst, torch.int64, device),
        prev.tokens.index_select(0, host_to_device(src, torch.int64, device)),
    )


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the packed batch whose logits are sampled
    sampled: tuple[ScheduledSeq, ...]  # the S sequences those rows belong to


def prepare_inputs(
    items: Seq[ScheduledSeq],
    block_size: int,
    device: torch.device,
    prev: DeviceTokens | None = None,
    tables: BlockTables | None = None,
) -> StepInputs:
    """``tables``: the runner's block tables, kept across steps; None: a table for this call."""
    if tables is None:
        tables = BlockTables(device)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    context_lens: list[int] = []
    logits_indices: list[int] = []
    sampled: list[ScheduledSeq] = []
    end = 0
    for it in items:
        seq, n = it.seq, it.num_tokens
        lo = seq.num_computed
        hi = lo + n
        blocks = seq.block_ids
        input_ids += seq.token_range(lo, hi)
        if n == 1:  # a decode row: no per-token loop
            positions.append(lo)
            slots.append(blocks[lo // block_size] * block_size + lo % block_size)
        else:
            positions += range(lo, hi)
            slots += [blocks[p // block_size] * block_size + p % block_size for p in range(lo, hi)]
        end += n
        starts.append(end)
        context_lens.append(hi)
        if hi == seq.num_tokens:  # ``it.samples``
            logits_indices.append(end - 1)
            sampled.append(it)
    rows = tables.assign([it.seq for it in items])  # [B] table slots
    # one upload per dtype: [ids | positions | slots | logits rows | table slots] and
    # [contexts | starts], each part at a 16-byte aligned start (``aligned_parts``)
    t = len(input_ids)
    ids, pos, slot_map, logits_rows, table_rows = aligned_parts(
        [input_ids, positions, slots, logits_indices, rows], torch.int64, device
    )
    ctx, qsl = aligned_parts([context_lens, starts], torch.int32, device)
    attn = AttentionMetadata(
        slot_mapping=slot_map,
        block_tables=tables.gather(table_rows, tables.width),
        context_lens=ctx,
        query_start_loc=qsl,
        is_decode=t == len(items),
    )
    patch = _patch(items, prev, device)
    if patch is not None:
        ids.index_copy_(0, *patch)
    return StepInputs(ids, pos, attn, logits_rows, tuple(sampled))


def aligned_parts(
    parts: Seq[list[int]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One upload of ``parts`` and a view of each, every view starting at a multiple of 16
    bytes. Triton specializes a kernel on whether each pointer argument is 16-byte aligned:
    views at offsets that change with the batch (positions after ``T`` ids, starts after ``B``
    contexts) would hand a kernel a new variant — a compile in the middle of serving — the
    first time an offset of the other class came up (workers/engine/kernel_compiles.py)."""
    per = 16 // dtype.itemsize  # elements in 16 bytes
    flat: list[int] = []
    spans = []
    for part in parts:
        start = len(flat)
        flat += part
        spans.append((start, len(flat)))
        flat += [0] * (-len(flat) % per)
    whole = host_to_device(flat, dtype, device)
    return [whole[a:b] for a, b in spans]


def _graphs_enabled(device: torch.device, use_cuda_graphs: bool | None) -> bool:
    if device.type != "cuda":
        return False
    if use_cuda_graphs is not None:
        return use_cuda_graphs
    # The reference decode body reads context lengths on the host: not capturable.
    return (
        os.environ.get("KVRELAY_CUDA_GRAPHS", "1") != "0"
        and os.environ.get("KVRELAY_KERNELS") != "reference"
    )


def _prefill_graphs_enabled(
    device: torch.device, use_cuda_graphs: bool | None, use_prefill_graphs: bool | None
) -> bool:
    if use_prefill_graphs is not None:
        return use_prefill_graphs
    return (
        _graphs_enabled(device, use_cuda_graphs)
        and os.environ.get("KVRELAY_PREFILL_GRAPHS", "1") != "0"
    )


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        *,
        use_cuda_graphs: bool | None = None,  # None: on for CUDA caches (KVRELAY_CUDA_GRAPHS=0 off)
        max_graph_batch: int = BATCH_SIZES[-1],
        sparse: SparseAttention | None = None,  # opt-in; graphs replay its capturable steps
        # unless its config turns ``graphs`` off (sparse decode steps then run eagerly)
        # None: with the decode graphs (KVRELAY_PREFILL_GRAPHS=0 off); True on CPU: the
        # padded path runs eagerly (tests compare it with the plain forward)
        use_prefill_graphs: bool | None = None,
        max_prefill_tokens: int = MAX_TOKENS,
        max_prefill_seqs: int = MAX_SEQS,  # the engine passes its max_num_seqs
    ) -> None:
        self.model = model
        self.sparse = sparse
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.graphs: DecodeGraphs | None = None
        sparse_decode = sparse if sparse is not None and sparse.config.decode else None
        eager_only = sparse_decode is not None and not sparse_decode.config.graphs
        if not eager_only and _graphs_enabled(self.device, use_cuda_graphs):
            max_blocks = min(kv_cache.shape[0], -(-model.config.max_context // block_size))
            self.graphs = DecodeGraphs(
                model, kv_cache, max_batch=max_graph_batch, max_blocks=max_blocks,
                sparse=sparse_decode,
            )  # fmt: skip
        self.prefill: PrefillGraphs | None = None
        if model.config.num_layers and _prefill_graphs_enabled(
            self.device, use_cuda_graphs, use_prefill_graphs
        ):
            self.prefill = PrefillGraphs(
                model, kv_cache, max_tokens=max_prefill_tokens, max_seqs=max_prefill_seqs
            )
        self.tables = BlockTables(self.device)  # the eager path's (graphs keep their own)
        self.eager_steps = 0  # steps not replaying a decode graph, prefill graph steps included
        self.graph_steps = 0
        self.prefill_graph_steps = 0  # of the eager steps, those run by ``prefill``
        self.eager_decode_steps = 0  # of the eager steps, pure decode steps (no graph held them)
        self.max_decode_rows = 0  # the largest pure decode step run
        # entered around each forward pass: a semi-PD lane releases its storage lock there
        # and waits for its kernels before taking it back (workers/semi_pd/lanes.py)
        self.forward_guard: Callable[[], AbstractContextManager[object]] = nullcontext
        # a serving worker's ``delivery`` times (workers/worker.py, set once its start-up
        # capture is done): the steps that stall a stream, recorded as phases — a decode step
        # that ran eagerly (``EAGER_DECODE``: its host seconds; no graph held its batch) and a
        # graph captured on first use (``LATE_CAPTURE``)
        self.stalls: PhaseTimes | None = None

    @torch.inference_mode()
    def run(
        self, items: Seq[ScheduledSeq], prev: DeviceTokens | None = None
    ) -> tuple[torch.Tensor, StepInputs]:
        """Returns fp32 logits ``[S, vocab]`` for the sequences that sample this step.
        ``prev``: the tokens of the step before, when the host has not read them yet.

        After a graph replay the logits are a view of the graph's output buffer: read them
        (sample) before the next ``run``.
        """
        if not items:
            raise ValueError("run() needs at least one scheduled sequence")
        with self.forward_guard():
            return self._forward(items, prev)

    def _forward(
        self, items: Seq[ScheduledSeq], prev: DeviceTokens | None
    ) -> tuple[torch.Tensor, StepInputs]:
        decode = all(it.num_tokens == 1 for it in items)
        if self.sparse is not None:
            self.sparse.begin_step(
                [it.seq.request_id for it in items],
                [it.seq.num_computed + it.num_tokens for it in items],
                decode,
                [it.seq.num_computed + it.num_tokens >= it.seq.num_tokens for it in items],
            )
        if decode and len(items) > self.max_decode_rows:
            self.max_decode_rows = len(items)
        capturable = self.sparse is None or self.sparse.capturable()
        t0 = time.perf_counter()
        if self.graphs is not None and decode and capturable:
            out = self._capturing(self.graphs, lambda: self._run_graph(items, prev))
            if out is not None:
                self.graph_steps += 1
                return out
        self.eager_steps += 1
        if decode:
            self.eager_decode_steps += 1
        try:
            return self._eager(items, prev, decode)
        finally:
            if decode and self.stalls is not None:
                self.stalls.add(EAGER_DECODE, time.perf_counter() - t0)

    def _capturing(self, graphs: DecodeGraphs | PrefillGraphs, run: Callable[[], R]) -> R:
        """``run()``, a replay of ``graphs``; the time of one that captured a graph first (on
        first use) is a ``LATE_CAPTURE`` stall."""
        captured, t0 = graphs.num_graphs, time.perf_counter()
        out = run()
        if self.stalls is not None and graphs.num_graphs != captured:
            self.stalls.add(LATE_CAPTURE, time.perf_counter() - t0)
        return out

    def _eager(
        self, items: Seq[ScheduledSeq], prev: DeviceTokens | None, decode: bool
    ) -> tuple[torch.Tensor, StepInputs]:
        inputs = prepare_inputs(items, self.block_size, self.device, prev, self.tables)
        inputs.attn.sparse = self.sparse
        hidden = None
        if self.prefill is not None and (self.sparse is None or not self.sparse.handles(decode)):
            prefill = self.prefill
            hidden = self._capturing(
                prefill, lambda: prefill.run(inputs.input_ids, inputs.positions, inputs.attn)
            )
            if hidden is not None:
                self.prefill_graph_steps += 1
        if hidden is None:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
        if not inputs.sampled:
            return torch.empty(0), inputs
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits, inputs

    def _run_graph(
        self, items: Seq[ScheduledSeq], prev: DeviceTokens | None
    ) -> tuple[torch.Tensor, StepInputs] | None:
        assert self.graphs is not None
        bs = self.block_size
        seqs = [it.seq for it in items]
        positions = [s.num_computed for s in seqs]
        tables = [s.block_ids for s in seqs]
        batch = DecodeBatch(
            input_ids=[s.token_at(p) for s, p in zip(seqs, positions, strict=True)],
            positions=positions,
            slots=[t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)],
            block_tables=tables,
            device_ids=_patch(items, prev, self.device),
        )
        replay = self.graphs.run(batch)
        if replay is None:
            return None
        logits = replay.logits
        # ``it.samples``: the row is its sequence's last token
        rows = [
            i
            for i, (s, p) in enumerate(zip(seqs, positions, strict=True))
            if p + 1 == len(s.prompt_ids) + len(s.output_ids)
        ]
        if len(rows) == len(items):
            indices = self.graphs.row_ids[: len(rows)]
        else:  # a one-token prefill chunk that does not reach the end of its prompt
            indices = host_to_device(rows, torch.int64, self.device)
            logits = logits.index_select(0, indices)
        sampled = tuple(items[i] for i in rows)
        inputs = StepInputs(replay.input_ids, replay.positions, replay.attn, indices, sampled)
        return logits, inputs
