"""Weight prefetch into L2 at small-batch decode (issue 17, workers/model/prefetch.py): the
decode graph step with each prefetch plan against no plan, on one GPU.

    python benchmarks/prefetch_bench.py [--models 1b] [--batches 1,8] [--rounds 3] [--out F]

gpu_models' random-weight bf16 model (the 1B shape: 1k-token contexts, vocab 128256, tied), one
CUDA-graph decode step timed as gpu_bench times it (``gpu ms``: the graph's replay between
events, median of 50). Rounds interleave the plans (off, then each plan, ``--rounds`` times, a
fresh runner and graph capture each), so a drift of the machine shows as spread, not as a gain.

Per plan and batch: median and range of the rounds' step times, the step against no plan, and
the fraction of the bandwidth limit (weights + KV bytes a step must read / the copy rate
measured here, read + write). Counters: the bytes a step prefetches (from the plan) and the
prefetch launches recorded while the graphs were made (each graph's eager warm-up and its
capture; a plan that recorded none did not run, and its row says so); the logits of every plan must equal those without one bit for
bit (a prefetch only reads), or the bench fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from kvrelay.benchmarks import gpu_bench, gpu_models
from kvrelay.kernels import triton_ops, triton_prefetch
from kvrelay.workers.engine.runner import ModelRunner
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.model.llama import kv_cache_shape
from kvrelay.workers.model.prefetch import PrefetchPlan, WeightPrefetch

PLANS = ("off", "o", "o,qkv", "o,down", "o,down,qkv", "o,qkv@128")


def plan_bytes(model: Any, plan: PrefetchPlan | None) -> int:
    if plan is None:
        return 0
    layers = list(model.layers)
    return sum(t.numel() * t.element_size() for i in range(len(layers))
               for t in plan.at_layer(layers, i))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--plans", default=",".join(p.replace(",", "+") for p in PLANS),
                    help="plans separated by commas, a plan's targets by +")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    plans = [p.replace("+", ",") for p in args.plans.split(",")]
    plans = ["off", *(p for p in plans if p != "off")]  # the baseline first in every round
    parsed = {spec: PrefetchPlan.parse(spec) for spec in plans}  # a bad plan fails here, first
    bw, _ = gpu_models.ceilings()
    print(f"# prefetch_bench on {torch.cuda.get_device_name()}: copy {bw:.0f} GB/s (read + write)",
          flush=True)  # fmt: skip
    launches = [0]

    def counting(*a: Any) -> None:
        launches[0] += 1
        triton_prefetch.l2_prefetch(*a)

    triton_ops.l2_prefetch = counting  # type: ignore[assignment]
    result: dict[str, Any] = {"copy_gbs": bw, "device": torch.cuda.get_device_name(), "rows": []}
    failed = False
    for name in args.models.split(","):
        hf, model, config = gpu_models.build(gpu_models.SHAPES[name])
        del hf
        torch.cuda.empty_cache()
        nblocks = max(batches) * (-(-gpu_models.CTX // gpu_models.BS) + 1) + 16
        cache = torch.empty(
            kv_cache_shape(config, nblocks, gpu_models.BS), dtype=torch.bfloat16, device="cuda"
        )
        cache.normal_(0, 0.5)
        items = [ScheduledSeq(s, 1) for s in gpu_models.make_seqs(1, gpu_models.CTX, 0, 1)]
        times: dict[tuple[str, int], list[float]] = {}
        limits: dict[int, float] = {}
        captured: dict[str, int] = {}
        reference: torch.Tensor | None = None
        for _ in range(args.rounds):
            for spec in plans:
                plan = parsed[spec]
                model.prefetch = WeightPrefetch(plan) if plan is not None else None
                launches[0] = 0
                runner = ModelRunner(model, cache, gpu_models.BS)
                gpu_bench.ours_decode(runner, model, config, bw, batches=batches)
                logits = runner.run(items)[0].clone()
                captured[spec] = launches[0]
                if reference is None:
                    reference = logits
                elif not torch.equal(logits, reference):
                    print(f"FAILED: {name} plan {spec}: logits differ from no plan", flush=True)
                    failed = True
                for b in batches:
                    row = gpu_bench.RESULTS["decode"][b]
                    times.setdefault((spec, b), []).append(row["gpu_ms"])
                    limits[b] = row["limit_ms"]
                runner = None  # type: ignore[assignment]
                torch.cuda.empty_cache()
        model.prefetch = None
        for b in batches:
            base = statistics.median(times[("off", b)])
            for spec in plans:
                ms = times[(spec, b)]
                med = statistics.median(ms)
                plan = parsed[spec]
                row = dict(model=name, batch=b, plan=spec, gpu_ms=med, min_ms=min(ms),
                           max_ms=max(ms), vs_off=med / base, frac=limits[b] / med,
                           prefetched_mb=plan_bytes(model, plan) / 1e6,
                           captured_launches=captured[spec])  # fmt: skip
                result["rows"].append(row)
                note = (
                    "" if plan is None or captured[spec] else "  (NO launch: the plan did not run)"
                )
                print(f"{name} b={b:3d} {spec:12s} gpu {med:7.3f} ms [{min(ms):.3f}-{max(ms):.3f}]"
                      f" = {med / base:.3f} x off | {limits[b] / med:.2f} of limit | prefetched "
                      f"{row['prefetched_mb']:6.1f} MB/step, {captured[spec]} launches at capture"
                      f"{note}", flush=True)  # fmt: skip
        del model, cache
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
