"""Issue 8 benchmark (1): one flooding tenant and one light tenant on one engine, FCFS vs fair
(vs priority with the light tenant more important): the light tenant's TTFT.

    .venv/bin/python benchmarks/fairness_bench.py [--policies fcfs fair priority]
        [--heavy 24 --heavy-prompt 128 --heavy-out 24 --light 8 --light-prompt 24 --light-out 16]
        [--light-span-s 12] [--max-num-seqs 4 --num-blocks 96] [--threads 1] [--json PATH]

One real engine per policy on the default model (SmolLM2-135M, fp32, CPU), fed by an open
loop on wall time (``run_open_loop``, also used by ``swap_bench.py``): a request is added to
the engine between steps once its arrival time has passed, the engine is stepped in a loop,
and every TokenEvent is stamped when its step returns. TTFT = first token stamp - arrival time
(the wait for the step in progress counts, as it would for a client). Workload (seeded random
token ids, greedy, EOS ignored): the heavy tenant's requests all arrive at t = 0; the light
tenant's arrive evenly over ``[0.5 s, light_span_s]``, while the flood is still backlogged.
``max_num_seqs`` and the pool are small so that the flood queues. Throughput = all generated
tokens / makespan. The model is loaded once; each engine is warmed up before its run.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kvrelay.benchmarks.loadgen_report import Percentiles, RequestResult
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.types import SamplingParams


@dataclass(frozen=True, slots=True)
class Arrival:
    request_id: str
    tenant: str
    at_s: float  # arrival, seconds from the run's start
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0  # lower = more important


@dataclass(frozen=True, slots=True)
class RunResult:
    results: tuple[RequestResult, ...]  # in arrival order
    outputs: dict[str, tuple[int, ...]]  # request id -> generated token ids
    makespan_s: float  # first arrival -> last token
    load_start: tuple[float, float, float]  # os.getloadavg() before / after the run
    load_end: tuple[float, float, float]


def random_prompt(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(100, 40_000) for _ in range(n))


def warm_up(engine: Engine) -> None:
    """One prefill + a few decode steps so that the first measured step pays no first-call cost;
    the warm-up's blocks stay only as prefix cache of random ids nobody asks for again."""
    engine.add_request("warmup", list(range(100, 164)), SamplingParams(max_tokens=4,
                       temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def run_open_loop(engine: Engine, arrivals: Sequence[Arrival], *, timeout_s: float) -> RunResult:
    """Drive ``engine`` with ``arrivals`` on wall time until every request finished.

    Between steps, every request whose arrival time has passed is added; when the engine has
    nothing to do the loop sleeps until the next arrival. Raises TimeoutError past ``timeout_s``.
    """
    pending = sorted(arrivals, key=lambda a: (a.at_s, a.request_id))
    by_id = {a.request_id: a for a in arrivals}
    if len(by_id) != len(arrivals):
        raise ValueError("duplicate request ids")
    stamps: dict[str, list[float]] = {a.request_id: [] for a in arrivals}
    tokens: dict[str, list[int]] = {a.request_id: [] for a in arrivals}
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter() - t0
        if now > timeout_s:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where it is stuck
            raise TimeoutError(f"run exceeded {timeout_s:.0f} s; engine {engine.stats()}")
        while i < len(pending) and pending[i].at_s <= now:
            a = pending[i]
            engine.add_request(a.request_id, list(a.prompt_ids), a.params, tenant=a.tenant,
                               priority=a.priority)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[i].at_s - (time.perf_counter() - t0)))
            continue
        events = engine.step()
        t = time.perf_counter() - t0
        for ev in events:
            stamps[ev.request_id].extend([t] * len(ev.token_ids))
            tokens[ev.request_id].extend(ev.token_ids)
    end = time.perf_counter() - t0
    load_end = os.getloadavg()
    results = []
    for a in pending:
        ts = stamps[a.request_id]
        gaps = tuple(b - c for b, c in zip(ts[1:], ts[:-1], strict=True))
        results.append(RequestResult(
            tenant=a.tenant, scheduled_s=a.at_s, sent_s=a.at_s,
            ttft_s=ts[0] - a.at_s if ts else None, gaps_s=gaps,
            e2e_s=(ts[-1] - a.at_s) if ts else 0.0, prompt_tokens=len(a.prompt_ids),
            output_tokens=len(ts), error="" if ts else "no tokens",
        ))
    first = min((a.at_s for a in arrivals), default=0.0)
    return RunResult(tuple(results), {k: tuple(v) for k, v in tokens.items()}, end - first,
                     load_start, load_end)


def workload(args: argparse.Namespace) -> list[Arrival]:
    rng = random.Random(args.seed)
    heavy = [
        Arrival(f"heavy-{k}", "heavy", 0.0, random_prompt(rng, args.heavy_prompt),
                SamplingParams(max_tokens=args.heavy_out, temperature=0.0, ignore_eos=True),
                priority=1)
        for k in range(args.heavy)
    ]
    step = (args.light_span_s - 0.5) / max(1, args.light - 1)
    light = [
        Arrival(f"light-{k}", "light", 0.5 + k * step, random_prompt(rng, args.light_prompt),
                SamplingParams(max_tokens=args.light_out, temperature=0.0, ignore_eos=True),
                priority=0)
        for k in range(args.light)
    ]
    return heavy + light


@dataclass(frozen=True, slots=True)
class PolicyRow:
    policy: str
    ttft_light: Percentiles
    ttft_heavy: Percentiles
    makespan_s: float
    out_tokens_per_s: float
    preemptions: int
    load_start: float  # 1-minute load average
    load_end: float


def run_policy(loaded: LoadedModel, policy: str, arrivals: Sequence[Arrival],
               args: argparse.Namespace) -> PolicyRow:
    cfg = EngineConfig(policy=policy, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=False, cpu_kv_gb=0.25)
    engine = Engine(loaded, cfg, device=args.device)
    try:
        warm_up(engine)
        base = engine.stats().preemptions
        run = run_open_loop(engine, arrivals, timeout_s=args.timeout_s)
        engine.check_integrity()
        preemptions = engine.stats().preemptions - base
    finally:
        engine.close()
    light = [r.ttft_s for r in run.results if r.tenant == "light" and r.ttft_s is not None]
    heavy = [r.ttft_s for r in run.results if r.tenant == "heavy" and r.ttft_s is not None]
    out = sum(r.output_tokens for r in run.results)
    return PolicyRow(policy, Percentiles.of(light), Percentiles.of(heavy), run.makespan_s,
                     out / run.makespan_s, preemptions, run.load_start[0], run.load_end[0])


def table(rows: Sequence[PolicyRow]) -> str:
    base = next((r for r in rows if r.policy == "fcfs"), rows[0])
    lines = [
        "| policy | light TTFT p50 (s) | light TTFT p99 (s) | p99 / fcfs | heavy TTFT p50 (s) "
        "| heavy TTFT p99 (s) | out tok/s | tok/s / fcfs | makespan (s) | preemptions "
        "| load 1m start→end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.policy} | {r.ttft_light.p50:.2f} | {r.ttft_light.p99:.2f} "
            f"| {r.ttft_light.p99 / base.ttft_light.p99:.3f} | {r.ttft_heavy.p50:.2f} "
            f"| {r.ttft_heavy.p99:.2f} | {r.out_tokens_per_s:.1f} "
            f"| {r.out_tokens_per_s / base.out_tokens_per_s:.3f} | {r.makespan_s:.1f} "
            f"| {r.preemptions} | {r.load_start:.1f}→{r.load_end:.1f} |"
        )
    return "\n".join(lines)


def add_engine_arguments(ap: argparse.ArgumentParser) -> None:
    """What the engine benchmarks share: threads, model, device and dtype, seed, timeout, json."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--json", default=None, help="write the rows here")


def load_engine_model(args: argparse.Namespace) -> LoadedModel:
    from kvrelay.workers.model.loader import load_model

    torch.set_num_threads(args.threads)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["fcfs", "fair", "priority"],
                    choices=["fcfs", "fair", "priority"])
    ap.add_argument("--heavy", type=int, default=24)
    ap.add_argument("--heavy-prompt", type=int, default=128)
    ap.add_argument("--heavy-out", type=int, default=24)
    ap.add_argument("--light", type=int, default=8)
    ap.add_argument("--light-prompt", type=int, default=24)
    ap.add_argument("--light-out", type=int, default=16)
    ap.add_argument("--light-span-s", type=float, default=12.0)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=96)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    add_engine_arguments(ap)
    args = ap.parse_args(argv)
    if min(args.heavy, args.light, args.heavy_prompt, args.light_prompt, args.heavy_out,
           args.light_out, args.max_num_seqs, args.threads) < 1 or args.light_span_s <= 0.5:
        raise SystemExit("counts and lengths must be >= 1 and --light-span-s > 0.5")
    loaded = load_engine_model(args)
    arrivals = workload(args)
    rows = []
    for policy in args.policies:
        row = run_policy(loaded, policy, arrivals, args)
        print(f"{policy}: light TTFT p99 {row.ttft_light.p99:.2f} s, "
              f"{row.out_tokens_per_s:.1f} tok/s, load {row.load_start:.1f}->{row.load_end:.1f}",
              flush=True)
        rows.append(row)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
