"""Persistent block tables (workers/engine/block_tables.py) against a table rebuilt from scratch
each step, through random joins, leaves, in-place growth, replaced block lists (preemption,
re-admission), absences and reorderings; and ``prepare_inputs`` with the persistent table equal
to ``prepare_inputs`` with a fresh one."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.workers.engine.block_tables import BlockTables
from kvrelay.workers.engine.runner import prepare_inputs
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.types import SamplingParams
from kvrelay_testing.block_tables import blocks, check_history, rebuilt

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
