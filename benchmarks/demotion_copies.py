"""Issue 16: host copy calls per CPU-tier demotion, counted, without a model or a GPU.

    .venv/bin/python benchmarks/demotion_copies.py [--steps 600] [--cpu-blocks 1000]

The real Scheduler over a real device pool with a real CPU tier (a 1-element block shape: the
bookkeeping of any model), fed as goodput_bench feeds a semi-PD prefill lane: three fresh
prompts a step (20 % of 1024-7936 tokens, the rest 50-700), 4096 tokens a step, every request
finished after its prompt, so the device pool fills with cached blocks and each allocation
evicts (demotes) some. A demotion's device-to-host copy runs in one copy call per run of
consecutive host block ids (``kernels/reference.py``, ``copy_blocks``); on CUDA each is a
``cudaMemcpyAsync`` and a GIL hand-off to the other lane. Counted here per demotion from the
ids the copier is given and how it orders them (``tiers.host_order``): the physical floor is
one call a demotion.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Sequence as Seq

import torch

from kvrelay.kernels.reference import block_runs
from kvrelay.workers.engine.scheduler import Scheduler
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.kv import tiers
from kvrelay.workers.kv.storage import build_kv_storage
from kvrelay.workers.types import SamplingParams


class CountingCopier(tiers.BlockCopier):
    """The tier's copier, counting each copy into the host cache as ``copy_blocks`` runs it."""

    def __init__(self, host_cache: torch.Tensor) -> None:
        super().__init__(host_cache.device, async_copies=False)
        self.host_cache = host_cache
        self.calls: list[int] = []  # copy calls, per demotion
        self.sizes: list[int] = []  # blocks, per demotion

    def copy_now(self, src: torch.Tensor, src_ids: Seq[int], dst: torch.Tensor,
                 dst_ids: Seq[int], *, wait: bool = True) -> None:  # fmt: skip
        if dst is self.host_cache and src_ids:
            # the device side is not on another device here: order the pairs as the copier
            # does for a device cache (the host side is ``dst``); the code before had no
            # ``host_order`` and copied in the order given (run it with that tree imported)
            host = dst_ids
            if hasattr(tiers, "host_order"):
                _, host = tiers.host_order(torch.empty(0, device="meta"), src_ids, dst, dst_ids)
            self.calls.append(len(block_runs(list(range(len(host))), list(host))))
            self.sizes.append(len(host))
        super().copy_now(src, src_ids, dst, dst_ids, wait=wait)


def run(steps: int, device_blocks: int, cpu_blocks: int, seed: int) -> dict[str, float]:
    st = build_kv_storage((1, 2, 16, 1, 1), torch.float32, torch.device("cpu"),
                          num_blocks=device_blocks, kv_gb=0.0, cpu_num_blocks=cpu_blocks,
                          cpu_kv_gb=0.0, async_copies=False)  # fmt: skip
    tier = st.cpu_tier
    assert tier is not None
    counter = tier.copier = CountingCopier(tier.cache)
    sched = Scheduler(st.pool, max_num_seqs=64, max_num_batched_tokens=4096, hash_root=1,
                      tier=tier)  # fmt: skip
    rng = random.Random(seed)
    n = 0
    for _ in range(steps):
        for _ in range(3):
            k = rng.randint(1024, 7936) if rng.random() < 0.2 else rng.randint(50, 700)
            prompt = [rng.randrange(49152) for _ in range(k)]
            sched.add(Sequence(f"r{n}", prompt, SamplingParams(max_tokens=1)))
            n += 1
        for item in sched.schedule().scheduled:
            sched.commit_computed(item)
            if item.samples:
                sched.finish(item.seq)
    st.pool.check_integrity()
    calls, sizes = counter.calls, counter.sizes
    if not calls:
        return {"demotions": 0, "demoted_blocks": tier.demoted_blocks}
    return {
        "demotions": len(calls),
        "blocks_median": statistics.median(sizes),
        "calls_median": statistics.median(calls),
        "calls_mean": statistics.mean(calls),
        "calls_per_block": sum(calls) / sum(sizes),
        "demoted_blocks": tier.demoted_blocks,
    }


def main(argv: Seq[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--device-blocks", type=int, default=4000)
    p.add_argument("--cpu-blocks", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    print(
        "| seed | demotions | blocks a demotion (median) | copy calls a demotion: median / mean "
        "| calls a block | floor (calls a demotion) |"
    )
    print("| ---: | ---: | ---: | --- | ---: | ---: |")
    for seed in args.seeds:
        r = run(args.steps, args.device_blocks, args.cpu_blocks, seed)
        if not r["demotions"]:
            p.error("no demotion happened: a larger --steps or a smaller --device-blocks")
        print(
            f"| {seed} | {r['demotions']:.0f} | {r['blocks_median']:.0f} | "
            f"{r['calls_median']:.0f} / {r['calls_mean']:.1f} | {r['calls_per_block']:.3f} | 1 |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
