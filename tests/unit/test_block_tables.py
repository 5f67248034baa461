"""Persistent block tables (workers/engine/block_tables.py) against a table rebuilt from scratch
each step, through random joins, leaves, in-place growth, replaced block lists (preemption,
re-admission), absences and reorderings; and ``prepare_inputs`` with the persistent table equal
to ``prepare_inputs`` with a fresh one. The CUDA-graph path's row check (``stale_rows``,
workers/engine/cuda_graphs.py) through the same histories."""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import numpy as np
import pytest
import torch

from kvrelay.workers.engine.block_tables import BlockTables
from kvrelay.workers.engine.cuda_graphs import stale_rows, width_buckets
from kvrelay.workers.engine.runner import prepare_inputs
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.types import SamplingParams
from kvrelay_testing.block_tables import blocks, check_history, evolve, rebuilt

CPU = torch.device("cpu")


@pytest.mark.parametrize("seed", range(6))
def test_persistent_table_equals_rebuilt_table(seed: int) -> None:
    check_history(CPU, seed)


def test_unchanged_batch_writes_no_row() -> None:
    rng = random.Random(0)
    seqs = [Sequence(f"s{i}", [1], SamplingParams()) for i in range(16)]
    for s in seqs:
        s.block_ids = blocks(rng, 5)
    tables = BlockTables(CPU)
    tables.assign(seqs)
    assert tables.row_writes == 16
    tables.assign(seqs)
    tables.assign(list(reversed(seqs)))  # reordered, same members
    assert tables.row_writes == 16
    seqs[3].block_ids += [7]  # grows a block: that row only
    seqs[5].block_ids = list(seqs[5].block_ids)  # same ids, a new list: rewritten
    tables.assign(seqs)
    assert tables.row_writes == 18
    tables.assign(seqs[:8])  # half leave: their slots are freed, no row of the rest rewritten
    assert tables.row_writes == 18
    tables.assign(seqs)  # they come back: rewritten once
    assert tables.row_writes == 26
    assert torch.equal(
        tables.gather(torch.tensor(tables.assign(seqs)), tables.width), rebuilt(seqs)
    )


@pytest.mark.parametrize("lens", [[1], [3, 1, 1], [5, 2, 7, 1, 1], [1, 1, 1, 1]])
def test_prepare_inputs_parts_start_16_byte_aligned(lens: list[int]) -> None:
    """Every kernel argument of an eager step starts at a 16-byte boundary whatever T and B
    (Triton compiles a variant per pointer alignment: a batch-dependent offset compiled
    kernels mid-serving) and holds what the step needs."""
    bs = 4
    items = []
    for i, n in enumerate(lens):
        seq = Sequence(f"s{i}", list(range(10 + i)), SamplingParams())
        seq.num_computed = 10 + i - n  # the last n prompt tokens are this step's
        seq.block_ids = list(range(100 * i, 100 * i + 4))
        items.append(ScheduledSeq(seq, n))
    x = prepare_inputs(items, bs, CPU)
    views = [x.input_ids, x.positions, x.logits_indices, x.attn.slot_mapping,
             x.attn.context_lens, x.attn.query_start_loc]  # fmt: skip
    assert [v.data_ptr() % 16 for v in views] == [0] * len(views)
    positions = [p for i, n in enumerate(lens) for p in range(10 + i - n, 10 + i)]
    assert x.positions.tolist() == positions
    assert x.input_ids.tolist() == positions  # token t of each prompt is t
    assert x.attn.slot_mapping.tolist() == [
        100 * i * bs + p for i, n in enumerate(lens) for p in range(10 + i - n, 10 + i)
    ]
    assert x.attn.context_lens.tolist() == [10 + i for i in range(len(lens))]
    assert x.attn.query_start_loc.tolist() == np.cumsum([0, *lens]).tolist()
    assert x.logits_indices.tolist() == (np.cumsum(lens) - 1).tolist()
    assert x.attn.is_decode == (set(lens) == {1})


def test_prepare_inputs_with_persistent_table_equals_fresh() -> None:
    """Mixed prefill chunks and decode rows over many steps: every input tensor the same."""
    rng = random.Random(3)
    bs = 4
    tables = BlockTables(CPU)
    seqs: list[Sequence] = []
    for step in range(120):
        if len(seqs) < 10 and rng.random() < 0.3:
            seq = Sequence(f"s{step}", [rng.randrange(50) for _ in range(rng.randint(1, 30))],
                           SamplingParams())  # fmt: skip
            seqs.append(seq)
        if seqs and rng.random() < 0.05:
            seqs.remove(rng.choice(seqs))
        items = []
        for seq in seqs:
            if rng.random() < 0.1:
                continue  # not scheduled this step
            n = min(seq.num_tokens - seq.num_computed, rng.randint(1, 8))
            need = -(-(seq.num_computed + n) // bs) - len(seq.block_ids)
            seq.block_ids += [rng.randrange(1000) for _ in range(need)]
            items.append(ScheduledSeq(seq, n))
        if not items:
            continue
        a = prepare_inputs(items, bs, CPU, tables=tables)
        b = prepare_inputs(items, bs, CPU)
        for x, y in [
            (a.input_ids, b.input_ids),
            (a.positions, b.positions),
            (a.logits_indices, b.logits_indices),
            (a.attn.slot_mapping, b.attn.slot_mapping),
            (a.attn.block_tables, b.attn.block_tables),
            (a.attn.context_lens, b.attn.context_lens),
            (a.attn.query_start_loc, b.attn.query_start_loc),
        ]:
            assert torch.equal(x, y), step
        assert a.sampled == b.sampled and a.attn.is_decode == b.attn.is_decode
        assert torch.equal(a.attn.block_tables, rebuilt([it.seq for it in items]))
        for it in items:  # commit: the sampled ones gain a token
            it.seq.num_computed += it.num_tokens
            if it.samples:
                it.seq.output_ids.append(rng.randrange(50))


@pytest.mark.parametrize("seed", range(6))
def test_graph_rows_rewritten_from_stale_rows_equal_rebuilt_table(seed: int) -> None:
    """``DecodeGraphs._stage``'s table staging on the host: rows in batch order, every row
    ``stale_rows`` returns rewritten whole at the bucket's width, all forgotten when the width
    changes; after each step the live rows equal the rebuilt table."""
    rng = random.Random(seed)
    rows, widths = 128, width_buckets(1024)
    device = np.zeros((rows, widths[-1]), dtype=np.int32)
    sent: list[Seq[int] | None] = [None] * rows
    lens = [0] * rows
    sent_width = 0
    pool: list[Sequence] = []
    written = fed = 0
    for step in range(300):
        batch = evolve(rng, pool, step)
        if not batch:
            continue
        assert len(batch) <= rows
        width = next(w for w in widths if w >= max(len(s.block_ids) for s in batch))
        if width != sent_width:
            sent, sent_width = [None] * rows, width
        for i in stale_rows([s.block_ids for s in batch], sent, lens):
            table = batch[i].block_ids
            device[i, :width] = 0
            device[i, : len(table)] = table
            written += 1
        fed += len(batch)
        want = np.zeros((len(batch), width), dtype=np.int32)
        got = rebuilt(batch).numpy()
        want[:, : got.shape[1]] = got
        assert np.array_equal(device[: len(batch), :width], want), f"step {step}"
    assert written < fed  # rows fed the same list at the same length were not rewritten


def test_stale_rows_only_for_new_or_grown_lists() -> None:
    rng = random.Random(1)
    tables = [blocks(rng, 64) for _ in range(8)]
    sent: list[Seq[int] | None] = [None] * 10
    lens = [0] * 10
    assert stale_rows(tables, sent, lens) == list(range(8))
    assert stale_rows(tables, sent, lens) == []
    tables[2] += [5]  # grown in place
    tables[4] = list(tables[4])  # same ids, a new list (re-admitted)
    tables[6] = blocks(rng, 64)  # replaced at the same length (preempted, swapped back)
    assert stale_rows(tables, sent, lens) == [2, 4, 6]
    assert stale_rows(tables[::-1], sent, lens) == list(range(8))  # reordered: rows move
    assert stale_rows(tables[::-1][:5], sent, lens) == []  # fewer rows: the rest stay as sent
