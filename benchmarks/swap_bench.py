"""Issue 8 benchmark (2): swap vs recompute preemption (vs the "auto" rule) on inter-token latency.

    .venv/bin/python benchmarks/swap_bench.py [--modes recompute swap auto] [--requests 12
        --prompt 64 --out 96] [--num-blocks 40] [--prefix-caching] [--threads 1] [--json PATH]

One real engine per mode on the default model (SmolLM2-135M, fp32, CPU; prefix caching off by
default so that a recompute really recomputes: with ``--prefix-caching``, as served, a resumed
request hits the full blocks its preemption left cached), the same open loop
as ``fairness_bench.py``: ``--requests`` requests of ``--prompt`` random token ids arrive at
t = 0 and generate ``--out`` tokens each (greedy, EOS ignored). The device pool (``--num-blocks``)
holds far fewer than all requests' final contexts, so running requests are preempted as they
grow: by moving their blocks to the CPU tier and back (swap; on a CPU-only worker the "CPU tier"
is a second host tensor and the copies are synchronous), or by freeing them and prefilling the
context again (recompute).

Figures per mode: inter-token gaps (every gap between successive tokens of a request, from the
step-return stamps) p50/p99, and the worst gap; makespan; preemptions by kind; bytes copied by
swaps; recomputed tokens = prompt tokens computed - the prompts' lengths (the brief's measure)
and extra tokens = all tokens computed - Σ(prompt + output - 1) (also counts output tokens
recomputed as context). The script asserts that the greedy outputs are identical across modes.

The mechanism behind the tail, per mode: requests preempted and the most preemptions of one
request (churn: a request swapped back in and soon out again), long gaps (over 10x the ITL
p50: a preemption's wait, or a step that also prefilled) and their sum, schedules that waited
for a copy because nothing else could run, and running rows that sat a step out for a
swap-out's blocks. ``--async-swaps`` runs the copies on the copy thread on a CPU-only worker
too, as a CUDA worker does (the CPU default copies inline).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kvrelay.benchmarks.fairness_bench import (
    Arrival,
    add_engine_arguments,
    load_engine_model,
    random_prompt,
    run_open_loop,
    warm_up,
)
from kvrelay.benchmarks.loadgen_report import Percentiles
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.scheduler import SchedulerOutput
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.types import SamplingParams

LONG_GAP = 10.0


@dataclass(frozen=True, slots=True)
class ModeRow:
    mode: str
    itl_s: Percentiles  # over every gap of every request
    max_gap_s: float
    makespan_s: float
    swaps_out: int
    swaps_in: int
    recompute_preemptions: int
    swap_bytes: int
    recomputed_prompt_tokens: int
    extra_tokens: int
    preempted_requests: int
    max_preemptions: int  # of one request
    long_gaps: int  # gaps over LONG_GAP x the ITL p50
    long_gap_s: float  # their sum
    copy_waits: int  # schedules that waited for a copy (nothing else could run)
    deferred_rows: int  # running rows that sat a step out for a swap-out's blocks
    swap_gb_per_s: float  # the rates the auto rule ends the run with
    recompute_tokens_per_s: float
    load_start: float  # 1-minute load average
    load_end: float


def run_mode(loaded: LoadedModel, mode: str, arrivals: Sequence[Arrival],
             args: argparse.Namespace) -> tuple[ModeRow, dict[str, tuple[int, ...]]]:
    cfg = EngineConfig(preemption_mode=mode, num_blocks=args.num_blocks,
                       max_num_seqs=args.requests, cpu_kv_gb=args.cpu_kv_gb,
                       enable_prefix_caching=args.prefix_caching,
                       async_swaps=True if args.async_swaps else None)
    engine = Engine(loaded, cfg, device=args.device)
    preempted: Counter[str] = Counter()
    try:
        warm_up(engine)
        s0 = engine.stats()
        scheduler = engine.scheduler
        schedule = scheduler.schedule

        def counted() -> SchedulerOutput:  # which requests each step preempts
            plan = schedule()
            preempted.update(plan.preempted)
            return plan

        scheduler.schedule = counted  # type: ignore[method-assign]
        run = run_open_loop(engine, arrivals, timeout_s=args.timeout_s)
        engine.check_integrity()
        s1 = engine.stats()
    finally:
        engine.close()
    prompt_tokens = sum(len(a.prompt_ids) for a in arrivals)
    needed = sum(len(a.prompt_ids) + len(run.outputs[a.request_id]) - 1 for a in arrivals)
    prompt_done = s1.prompt_tokens_computed - s0.prompt_tokens_computed
    decode_done = s1.decode_tokens_computed - s0.decode_tokens_computed
    gaps = [g for r in run.results for g in r.gaps_s]
    itl = Percentiles.of(gaps)
    long = [g for g in gaps if g > LONG_GAP * itl.p50]
    x0, x1 = s0.extra, s1.extra
    row = ModeRow(
        mode=mode, itl_s=itl, max_gap_s=max(gaps, default=float("nan")),
        makespan_s=run.makespan_s, swaps_out=s1.swaps_out - s0.swaps_out,
        swaps_in=s1.swaps_in - s0.swaps_in,
        recompute_preemptions=s1.recompute_preemptions - s0.recompute_preemptions,
        swap_bytes=s1.swap_bytes - s0.swap_bytes,
        recomputed_prompt_tokens=prompt_done - prompt_tokens,
        extra_tokens=prompt_done + decode_done - needed,
        preempted_requests=len(preempted), max_preemptions=max(preempted.values(), default=0),
        long_gaps=len(long), long_gap_s=sum(long),
        copy_waits=int(x1["swap_copy_waits"] - x0["swap_copy_waits"]),
        deferred_rows=int(x1["swap_deferred_rows"] - x0["swap_deferred_rows"]),
        swap_gb_per_s=x1["swap_bytes_per_s"] / 1e9,
        recompute_tokens_per_s=x1["recompute_tokens_per_s"],
        load_start=run.load_start[0], load_end=run.load_end[0],
    )
    return row, run.outputs


def table(rows: Sequence[ModeRow]) -> str:
    base = next((r for r in rows if r.mode == "recompute"), rows[0])
    ms = 1000.0
    lines = [
        "| mode | ITL p50 (ms) | ITL p99 (ms) | p99 / recompute | max gap (ms) | makespan (s) "
        "| time / recompute | swaps out/in | recompute preemptions | swap MB "
        "| recomputed prompt tokens | extra tokens | load 1m start→end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.itl_s.p50 * ms:.0f} | {r.itl_s.p99 * ms:.0f} "
            f"| {r.itl_s.p99 / base.itl_s.p99:.3f} | {r.max_gap_s * ms:.0f} "
            f"| {r.makespan_s:.1f} | {r.makespan_s / base.makespan_s:.3f} "
            f"| {r.swaps_out}/{r.swaps_in} | {r.recompute_preemptions} "
            f"| {r.swap_bytes / 1e6:.1f} | {r.recomputed_prompt_tokens} | {r.extra_tokens} "
            f"| {r.load_start:.1f}→{r.load_end:.1f} |"
        )
    lines += [
        "",
        "| mode | requests preempted | most preemptions of one | long gaps (> "
        f"{LONG_GAP:.0f}x p50) | their sum (s) | copy waits | rows deferred for a swap-out "
        "| swap GB/s | recompute tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.preempted_requests} | {r.max_preemptions} | {r.long_gaps} "
            f"| {r.long_gap_s:.1f} | {r.copy_waits} | {r.deferred_rows} "
            f"| {r.swap_gb_per_s:.2f} | {r.recompute_tokens_per_s:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", default=["recompute", "swap", "auto"],
                    choices=["recompute", "swap", "auto"])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--out", type=int, default=96)
    ap.add_argument("--num-blocks", type=int, default=40)
    ap.add_argument("--cpu-kv-gb", type=float, default=0.25)
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--async-swaps", action="store_true",
                    help="copies on the copy thread on CPU too (as on CUDA)")
    add_engine_arguments(ap)
    args = ap.parse_args(argv)
    if min(args.requests, args.prompt, args.out, args.num_blocks, args.threads) < 1:
        raise SystemExit("counts, lengths and --num-blocks must be >= 1")
    if args.requests * -(-(args.prompt + args.out) // 16) <= args.num_blocks:
        raise SystemExit("the pool holds every request's final context: nothing would preempt")
    loaded = load_engine_model(args)
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.out, temperature=0.0, ignore_eos=True)
    arrivals = [Arrival(f"r{k}", "", 0.0, random_prompt(rng, args.prompt), params)
                for k in range(args.requests)]
    rows, outputs = [], []
    for mode in args.modes:
        row, out = run_mode(loaded, mode, arrivals, args)
        print(f"{mode}: ITL p99 {row.itl_s.p99 * 1e3:.0f} ms, makespan {row.makespan_s:.1f} s, "
              f"load {row.load_start:.1f}->{row.load_end:.1f}", flush=True)
        rows.append(row)
        outputs.append(out)
    same = all(o == outputs[0] for o in outputs)
    print(table(rows))
    print(f"greedy outputs identical across modes: {same} "
          f"({args.requests} requests x {args.out} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "outputs_identical": same}, f, indent=2)
    assert same, "greedy outputs differ between preemption modes"


if __name__ == "__main__":
    main()
