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

CPU = torch.device("cpu")


def rebuilt(seqs: list[Sequence]) -> torch.Tensor:
    """The table as built before it persisted: rows padded with 0 to the longest."""
    width = max(len(s.block_ids) for s in seqs)
    return torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs])


def blocks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10_000) for _ in range(n)]


def evolve(rng: random.Random, pool: list[Sequence], step: int) -> list[Sequence]:
    """One step's changes to ``pool`` (in place); returns the step's batch."""
    op = rng.random()
    if op < 0.15 or not pool:  # join
        seq = Sequence(f"s{step}", [1], SamplingParams())
        seq.block_ids = blocks(rng, rng.randint(1, 40))
        pool.append(seq)
    elif op < 0.25:  # leave (finish, abort, handoff)
        pool.remove(rng.choice(pool))
    elif op < 0.35:  # preempted and re-admitted: a new list, sometimes of the same length
        seq = rng.choice(pool)
        seq.block_ids = blocks(rng, rng.choice([len(seq.block_ids), rng.randint(1, 40)]))
    elif op < 0.45:  # blocks released (recompute preemption): an empty list, then regrown
        seq = rng.choice(pool)
        seq.block_ids = []
        seq.block_ids += blocks(rng, rng.randint(1, 5))
    for seq in pool:  # decode growth: a block every few steps, appended in place
        if rng.random() < 0.2:
            seq.block_ids += blocks(rng, rng.randint(1, 3))
    batch = [s for s in pool if rng.random() < 0.9] or pool[:1]  # some sit a step out
    if rng.random() < 0.2:
        rng.shuffle(batch)
    return batch


@pytest.mark.parametrize("seed", range(6))
def test_persistent_table_equals_rebuilt_table(seed: int) -> None:
    rng = random.Random(seed)
    tables = BlockTables(CPU, rows=2, width=4)  # small: growth of both dimensions is exercised
    pool: list[Sequence] = []
    for step in range(300):
        batch = evolve(rng, pool, step)
        if not batch:  # the last one left
            continue
        slots = tables.assign(batch)
        assert len(set(slots)) == len(slots)
        got = tables.gather(torch.tensor(slots), tables.width)
        assert torch.equal(got, rebuilt(batch).to(torch.int32)), f"step {step}"


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
        tables.gather(torch.tensor(tables.assign(seqs)), tables.width), rebuilt(seqs).int()
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
        assert torch.equal(a.attn.block_tables, rebuilt([it.seq for it in items]).int())
        for it in items:  # commit: the sampled ones gain a token
            it.seq.num_computed += it.num_tokens
            if it.samples:
                it.seq.output_ids.append(rng.randrange(50))
