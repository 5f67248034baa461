"""Random batch histories for the persistent block tables (workers/engine/block_tables.py): the
unit test runs them on CPU, tests/gpu on CUDA, both against a table rebuilt from scratch."""

from __future__ import annotations

import random

import torch

from kvrelay.workers.engine.block_tables import BlockTables
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.types import SamplingParams


def rebuilt(seqs: list[Sequence]) -> torch.Tensor:
    """The table as built before it persisted: rows padded with 0 to the longest, int32."""
    width = max(len(s.block_ids) for s in seqs)
    return torch.tensor(
        [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs], dtype=torch.int32
    )


def blocks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10_000) for _ in range(n)]


def evolve(rng: random.Random, pool: list[Sequence], step: int) -> list[Sequence]:
    """One step's changes to ``pool`` (in place); returns the step's batch (maybe empty)."""
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


def check_history(device: torch.device, seed: int, steps: int = 300) -> None:
    """``steps`` random steps; after each, the gathered table equals the rebuilt one. Starts
    small (2 rows, 4 blocks wide) so both dimensions grow."""
    rng = random.Random(seed)
    tables = BlockTables(device, rows=2, width=4)
    pool: list[Sequence] = []
    for step in range(steps):
        batch = evolve(rng, pool, step)
        if not batch:  # the last one left
            continue
        slots = tables.assign(batch)
        assert len(set(slots)) == len(slots)
        got = tables.gather(torch.tensor(slots, device=device), tables.width)
        assert torch.equal(got.cpu(), rebuilt(batch)), f"step {step}"
