"""The CUDA-graph path's changed-row check (issue 17): ``stale_rows`` (list identity and length,
workers/engine/cuda_graphs.py) against the check before it (each row's ids compared with a copy
of the list last sent, the copy refreshed for each changed row).

    python benchmarks/stale_rows_bench.py [--rows 128] [--widths 16 64 256 1024] [--steps 400]
        [--reps 3] [--block-size 16]

Host only (no GPU): ``rows`` sequences decode with ``width``-block tables; each step
``rows / block_size`` of them gain a block in place, as a steady decode batch does. Per config,
median µs per call over ``--steps`` steps, median of ``--reps`` (min–max). Check: both return the
same rows every step, and exactly the grown ones.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

from kvrelay.workers.engine.cuda_graphs import stale_rows

Check = Callable[[list[list[int]]], list[int]]


def by_ids(rows: int) -> Check:
    """The check before: compare each row with a copy of the list last sent."""
    sent: list[list[int] | None] = [None] * rows

    def check(tables: list[list[int]]) -> list[int]:
        changed = [i for i, t in enumerate(tables) if sent[i] != t]
        for i in changed:
            sent[i] = list(tables[i])
        return changed

    return check


def by_identity(rows: int) -> Check:
    sent: list[Seq[int] | None] = [None] * rows
    lens = [0] * rows
    return lambda tables: stale_rows(tables, sent, lens)


def run(make: Callable[[int], Check], rows: int, width: int, steps: int, grow: int) -> float:
    rng = random.Random(0)
    tables = [[rng.randrange(100_000) for _ in range(width - 1)] for _ in range(rows)]
    check = make(rows)
    assert check(tables) == list(range(rows))
    times = []
    for step in range(steps):
        first = step * grow % rows
        grown = list(range(first, first + grow))
        for i in grown:
            tables[i].append(rng.randrange(100_000))
        t0 = time.perf_counter()
        changed = check(tables)
        times.append(time.perf_counter() - t0)
        assert changed == grown, (step, changed, grown)
        if step % (rows // grow) == rows // grow - 1:  # every row grew once: back to width - 1
            for t in tables:
                del t[width - 1 :]
            check(tables)  # (untimed: in a real batch the lists only grow)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    grow = max(1, args.rows // args.block_size)
    print(f"rows {args.rows}, {grow} rows grow a block each step; µs per call, median (min–max)")
    print("| width (blocks) | ids compared (before) | stale_rows | before / after |")
    print("| ---: | ---: | ---: | ---: |")
    for width in args.widths:
        out = {}
        for name, make in (("before", by_ids), ("after", by_identity)):
            out[name] = [run(make, args.rows, width, args.steps, grow) for _ in range(args.reps)]
        before, after = (statistics.median(out[k]) for k in ("before", "after"))
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" for v in out.values()]
        print(f"| {width} | {cells[0]} | {cells[1]} | {before / after:.2f} |")


if __name__ == "__main__":
    main()
