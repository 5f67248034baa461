"""Issue 17: the scheduler's preemptions at swap_bench's GPU shape, without a model or a GPU.

    .venv/bin/python benchmarks/swap_replay.py [--requests 64 --prompt 512 --out 256
        --num-blocks 1024] [--copy-steps 0 1 2 4]

The real Scheduler over real block pools (a 1-element block shape: the bookkeeping of any
model), driven as swap_bench drives an engine: every request arrives at t = 0, each step
"computes" what was planned and appends a token to each row that samples, prefix caching off.
The only thing modelled is when a swap's copy lands: ``--copy-steps`` steps after it started
(0: inline, as on a CPU worker; on an H100 a swap-out of a 1B fp32 request, ~40 MB, takes about
one 5 ms decode step over PCIe). A copy the scheduler waits for lands at once.

Per mode and copy latency: swaps and recompute preemptions, requests preempted and the most
preemptions of one request (churn), rows that sat a step out for a swap-out's blocks, schedules
that waited for a copy, and steps. ITL is not modelled: swap_bench measures it.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence as Seq
from concurrent.futures import Future

import torch

from kvrelay.workers.engine.scheduler import Scheduler
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import DONE, BlockCopier, CopyHandle, CpuTier
from kvrelay.workers.types import SamplingParams


class _Landing(Future[float]):
    """A copy in flight; a wait for it lands it at once (the copy stream gets there)."""

    def result(self, timeout: float | None = None) -> float:
        if not self.done():
            self.set_result(1e-3)
        return super().result(timeout)


class LateCopier(BlockCopier):
    """Copies whose handles are done ``steps`` calls of ``tick`` after they started."""

    def __init__(self, steps: int) -> None:
        super().__init__(torch.device("cpu"), async_copies=False)
        self.steps = steps
        self.pending: list[tuple[int, _Landing]] = []
        self.now = 0

    @property
    def is_async(self) -> bool:
        return self.steps > 0

    def copy(
        self, src: torch.Tensor, src_ids: Seq[int], dst: torch.Tensor, dst_ids: Seq[int]
    ) -> CopyHandle:
        if self.steps == 0 or not src_ids:
            return super().copy(src, src_ids, dst, dst_ids) if src_ids else DONE
        self.copy_now(src, src_ids, dst, dst_ids)
        done = _Landing()
        self.pending.append((self.now + self.steps, done))
        return CopyHandle(done)

    def tick(self) -> None:
        self.now += 1
        for due, done in self.pending:
            if due <= self.now and not done.done():
                done.set_result(1e-3)
        self.pending = [(d, f) for d, f in self.pending if not f.done()]


def replay(mode: str, copy_steps: int, args: argparse.Namespace) -> dict[str, int]:
    bs = 16
    pool = BlockPool(args.num_blocks, bs)
    copier = LateCopier(copy_steps)
    cache = torch.zeros(args.num_blocks, 1, 1, 1, 1, 1)
    tier = CpuTier(cache, pool, args.cpu_blocks, copier)
    # the recompute rate only matters to auto, whose rule then compares it with the probe
    s = Scheduler(pool, max_num_seqs=args.requests, max_num_batched_tokens=512, hash_root=1,
                  enable_prefix_caching=False, tier=tier, preemption_mode=mode,
                  recompute_tokens_per_s=args.recompute_tokens_per_s)  # fmt: skip
    params = SamplingParams(max_tokens=args.out, ignore_eos=True)
    for k in range(args.requests):
        prompt = [1 + (k * 7919 + j) % 30000 for j in range(args.prompt)]
        s.add(Sequence(f"r{k}", prompt, params, arrival_time=float(k)))
    preempted: Counter[str] = Counter()
    steps = 0
    while s.has_work():
        plan = s.schedule()
        preempted.update(plan.preempted)
        steps += 1
        for item in plan.scheduled:
            seq, samples = item.seq, item.samples
            s.commit_computed(item)
            if samples:
                seq.output_ids.append(7)
                if len(seq.output_ids) >= args.out:
                    s.finish(seq)
        copier.tick()
        if steps > 100 * (args.out + args.prompt):
            raise RuntimeError("the replay does not finish")
    s.check_integrity()
    pool.check_integrity()
    tier.pool.check_integrity()
    return {
        "swaps": s.swaps_out,
        "recompute_preemptions": s.recompute_preemptions,
        "requests_preempted": len(preempted),
        "most_of_one": max(preempted.values(), default=0),
        "deferred_rows": s.deferred_rows,
        "copy_waits": s.copy_waits,
        "steps": steps,
    }


def main(argv: Seq[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["recompute", "swap", "auto"],
        choices=["recompute", "swap", "auto"],
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--out", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--cpu-blocks", type=int, default=4096)
    ap.add_argument("--copy-steps", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--recompute-tokens-per-s", type=float, default=70_000.0)
    args = ap.parse_args(argv)
    keys = [
        "swaps",
        "recompute_preemptions",
        "requests_preempted",
        "most_of_one",
        "deferred_rows",
        "copy_waits",
        "steps",
    ]
    print(f"| mode | copy lands after (steps) | {' | '.join(k.replace('_', ' ') for k in keys)} |")
    print("| --- | ---: |" + " ---: |" * len(keys))
    for mode in args.modes:
        for lag in [0] if mode == "recompute" else args.copy_steps:
            row = replay(mode, lag, args)
            print(f"| {mode} | {lag} | {' | '.join(str(row[k]) for k in keys)} |", flush=True)


if __name__ == "__main__":
    main()
