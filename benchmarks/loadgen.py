"""Open-loop load generator for kvrelay (BurstGPT-style bursty traffic), with a goodput sweep.

    python -m kvrelay.benchmarks.loadgen --url http://127.0.0.1:8000 --rate 2 --duration 60 \
        --tenants heavy:0.9,light:0.1 --ttft-slo 1.0 --itl-slo 0.1 --json out.json
    python -m kvrelay.benchmarks.loadgen --sweep 0.5,1,2,4 --num-requests 200 ...
    python -m kvrelay.benchmarks.loadgen --trace benchmarks/data/burstgpt_synthetic_sample.csv \
        --time-scale 60 ...
    python -m kvrelay.benchmarks.loadgen --write-synthetic-csv PATH --num-requests 3000
    python -m kvrelay.benchmarks.loadgen --sweep 32,64 --num-requests 600 \
        --long-fraction 0.2 --long-prompt-range 1024,7936 --max-context 8192 ...   # issue 16

Mixed workload (issue 16): ``--long-fraction F`` makes F of the requests long prompts
(``--long-prompt-range``, outputs < ``--long-output-tokens``) arriving in bursts of 2–4 while
the chat streams decode; the rate counts both (loadgen_workload.py). ``--max-context`` cuts
prompts so that prompt + output fit the model's context (else the server answers 400).
The rates of a sweep send the same workload and, unless ``--fresh-prompts``, the same prompts.

Open loop: each request is sent at its scheduled time whether or not earlier ones finished
(a closed loop would hide queueing). ``--max-in-flight`` bounds the client: a request over the
cap is recorded as an error, never delayed. Everything stops by ``--timeout``.
Workload: loadgen_workload.py; drivers: loadgen_drivers.py; report: loadgen_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from kvrelay.benchmarks.loadgen_drivers import Send, grpc_driver, http_driver, open_grpc_client
from kvrelay.benchmarks.loadgen_report import (
    RequestResult,
    Summary,
    format_table,
    goodput,
    summarize_by_tenant,
    to_json,
)
from kvrelay.benchmarks.loadgen_workload import (
    PROMPT_SLACK,
    Arrival,
    fit_context,
    parse_tenants,
    read_burstgpt_csv,
    rescale_to_rate,
    synth_prompt,
    synthetic_workload,
    write_burstgpt_csv,
)
from kvrelay.cluster.metrics.loop_lag import lag_summary_ms, watch_loop_lag

LAG_TICK_S = 0.005  # the client's own loop-lag ticker


@dataclass(frozen=True, slots=True)
class RunResult:
    results: tuple[RequestResult, ...]
    duration_s: float
    # how late this client's event loop woke during the run (a 5 ms ticker): every
    # chunk's arrival stamp is late by as much, so an ITL tail near these is the client's
    loop_lags_s: tuple[float, ...] = ()

    def loop_lag_ms(self) -> dict[str, float]:
        """p50 / p99 / max of ``loop_lags_s``, ms (zeros without samples)."""
        return lag_summary_ms(self.loop_lags_s)


async def run_open_loop(
    arrivals: Sequence[Arrival],
    send: Send,
    clock: Callable[[], float],
    *,
    seed: int | Sequence[int] = 0,
    timeout_s: float = 600.0,
    max_in_flight: int = 1024,
) -> RunResult:
    """Send each arrival at ``t_s`` after start; gather results; cancel what is left at the
    timeout (recorded as errors). ``seed`` seeds the prompts' words."""
    rng = np.random.default_rng(seed)
    start = clock()
    tasks: dict[asyncio.Task[RequestResult], Arrival] = {}
    refused: list[RequestResult] = []

    async def launch() -> None:
        for i, a in enumerate(arrivals):
            delay = start + a.t_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the schedule, not synchronisation
            if sum(not t.done() for t in tasks) >= max_in_flight:
                refused.append(
                    RequestResult(
                        a.tenant,
                        a.t_s,
                        clock() - start,
                        None,
                        (),
                        0.0,
                        a.prompt_tokens,
                        0,
                        "client: in-flight cap",
                    )
                )
                continue
            prompt = synth_prompt(a.prompt_tokens, i, rng)
            tasks[asyncio.create_task(send(a, prompt, a.t_s))] = a

    lags: list[float] = []
    lag_ticker = asyncio.create_task(watch_loop_lag(lags.append, LAG_TICK_S))
    launcher = asyncio.create_task(launch())
    try:
        await asyncio.wait_for(asyncio.shield(launcher), timeout_s)
    except asyncio.TimeoutError:
        launcher.cancel()
    left = max(0.0, start + timeout_s - clock())
    if tasks:
        await asyncio.wait(list(tasks), timeout=left)
    results = list(refused)
    for t, a in tasks.items():
        if t.done() and not t.cancelled() and t.exception() is None:
            results.append(t.result())
        else:
            t.cancel()
            results.append(
                RequestResult(
                    a.tenant, a.t_s, a.t_s, None, (), 0.0, a.prompt_tokens, 0, "timeout: run ended"
                )
            )
    await asyncio.gather(*tasks, return_exceptions=True)
    lag_ticker.cancel()
    results.sort(key=lambda r: r.scheduled_s)
    return RunResult(tuple(results), max(clock() - start, 1e-9), tuple(lags))


def _workload(args: argparse.Namespace, rate: float | None) -> list[Arrival]:
    tenants = parse_tenants(args.tenants)
    if args.trace:
        arr = read_burstgpt_csv(
            args.trace,
            args.time_scale,
            limit=args.num_requests,
            tenants=tenants,
            seed=args.seed,
            max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens,
        )
        if rate is not None:  # --rate / --sweep on a trace: replay it at that mean rate
            arr = rescale_to_rate(arr, rate)
    else:
        n = args.num_requests or 100_000
        arr = synthetic_workload(
            n,
            args.seed,
            rate=rate,
            shape=args.gamma_shape,
            scale=args.gamma_scale,
            zipf_a=args.zipf_a,
            max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens,
            tenants=tenants,
            min_output_tokens=args.min_output_tokens,
            **long_prompts(args),
        )
    if args.max_context:
        arr = fit_context(arr, args.max_context)
    if args.duration:
        arr = [a for a in arr if a.t_s < args.duration]
    return arr


def long_prompts(args: argparse.Namespace) -> dict[str, Any]:
    """synthetic_workload's long-prompt keywords from the CLI's."""
    try:
        lo, hi = (int(x) for x in args.long_prompt_range.split(","))
    except ValueError:
        raise ValueError("--long-prompt-range: give LO,HI") from None
    return {
        "long_fraction": args.long_fraction,
        "long_prompt_range": (lo, hi),
        "long_output_tokens": args.long_output_tokens,
    }


def prompt_seed(args: argparse.Namespace, run: int) -> int | list[int]:
    """Seed of the words of the sweep's ``run``-th rate: ``--prompt-seed`` (default ``--seed``);
    with ``--fresh-prompts`` every rate after the first draws its own words, so that it does
    not re-send the prompts an earlier rate left in the server's prefix cache (a hit would skip
    their prefill). Lengths and arrivals stay the workload's either way."""
    seed = args.seed if args.prompt_seed is None else args.prompt_seed
    return [seed, run] if args.fresh_prompts and run else seed


async def _run_once(
    args: argparse.Namespace, arrivals: Sequence[Arrival], run: int = 0
) -> RunResult:
    loop = asyncio.get_running_loop()
    start = loop.time()

    def since_start() -> float:
        return loop.time() - start

    if args.backend == "grpc":
        client = open_grpc_client(args.grpc_target)
        try:
            send = grpc_driver(
                client, args.model, request_timeout_s=args.request_timeout, t0=since_start
            )
            return await run_open_loop(
                arrivals,
                send,
                loop.time,
                seed=prompt_seed(args, run),
                timeout_s=args.timeout,
                max_in_flight=args.max_in_flight,
            )
        finally:
            closing = client.close()
            if asyncio.iscoroutine(closing):
                await closing
    limits = aiohttp.TCPConnector(limit=args.max_in_flight)
    async with aiohttp.ClientSession(connector=limits) as session:
        send = http_driver(
            session,
            args.url,
            args.model,
            chat=args.endpoint == "chat",
            request_timeout_s=args.request_timeout,
            t0=since_start,
        )
        return await run_open_loop(
            arrivals,
            send,
            loop.time,
            seed=prompt_seed(args, run),
            timeout_s=args.timeout,
            max_in_flight=args.max_in_flight,
        )


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    if args.sweep:
        rates = sorted(float(x) for x in args.sweep.split(","))
        points: dict[str, list[tuple[float, float]]] = {}
        runs: dict[str, dict[str, Summary]] = {}
        client_lag: dict[str, dict[str, float]] = {}
        for k, rate in enumerate(rates):
            run = await _run_once(args, _workload(args, rate), k)
            sums = summarize_by_tenant(run.results, run.duration_s, args.ttft_slo, args.itl_slo)
            runs[f"{rate:g}"] = sums
            client_lag[f"{rate:g}"] = run.loop_lag_ms()
            for name, s in sums.items():
                points.setdefault(name, []).append((rate, s.slo_attainment))
            print(f"\n== rate {rate:g} req/s ==\n{format_table(sums, args.ttft_slo, args.itl_slo)}")
            print(_lag_line(run))
        gp = {name: goodput(pts) for name, pts in points.items()}
        print(
            "\ngoodput (req/s at >= 90% SLO attainment): "
            + ", ".join(f"{k}={v:g}" for k, v in gp.items())
        )
        return {"mode": "sweep", "runs": runs, "attainment": points, "goodput_rps": gp,
                "client_loop_lag_ms": client_lag}  # fmt: skip
    run = await _run_once(args, _workload(args, args.rate))
    sums = summarize_by_tenant(run.results, run.duration_s, args.ttft_slo, args.itl_slo)
    print(format_table(sums, args.ttft_slo, args.itl_slo))
    print(_lag_line(run))
    return {"mode": "single", "rate": args.rate, "summary": sums,
            "client_loop_lag_ms": run.loop_lag_ms()}  # fmt: skip


def _lag_line(run: RunResult) -> str:
    lag = run.loop_lag_ms()
    return (f"client loop lag ms p50 / p99 / max: {lag['p50']:.1f} / {lag['p99']:.1f} / "
            f"{lag['max']:.0f} ({lag['ticks']:.0f} ticks of {1e3 * LAG_TICK_S:g} ms)")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--backend", choices=("http", "grpc"), default="http")
    a("--url", default="http://127.0.0.1:8000", help="OpenAI HTTP base URL (loopback)")
    a("--grpc-target", default="127.0.0.1:50051")
    a("--model", default="")
    a("--endpoint", choices=("chat", "completions"), default="chat")
    a("--rate", type=float, default=None, help="mean req/s (default: BurstGPT's 1/(shape*scale))")
    a("--gamma-shape", type=float, default=0.5)
    a("--gamma-scale", type=float, default=2.0)
    a("--zipf-a", type=float, default=1.1)
    a("--max-prompt-tokens", type=int, default=1024)
    a("--max-output-tokens", type=int, default=1024)
    a(
        "--min-output-tokens",
        type=int,
        default=1,
        help="chat streams' outputs are at least this (synthetic workload; long prompts keep theirs)",
    )
    a("--long-fraction", type=float, default=0.0, help="share of long-prompt requests, in bursts")
    a("--long-prompt-range", default="1024,8192", metavar="LO,HI", help="long prompts' tokens")
    a("--long-output-tokens", type=int, default=16, help="long requests' outputs are below this")
    a("--max-context", type=int, default=None, help="cut prompts so prompt + output fit this")
    a("--trace", help="replay a BurstGPT-format CSV instead of generating")
    a(
        "--time-scale",
        type=float,
        default=1.0,
        help="replay speed-up: Timestamp / scale (--rate, if given, rescales to that mean rate)",
    )
    a("--tenants", default="default:1", help="e.g. heavy:0.9,light:0.1")
    a("--num-requests", type=int, default=None)
    a("--duration", type=float, default=None, help="only arrivals in the first N seconds")
    a("--timeout", type=float, default=600.0, help="overall limit of one run, seconds")
    a("--request-timeout", type=float, default=120.0)
    a("--max-in-flight", type=int, default=1024)
    a("--ttft-slo", type=float, default=1.0, help="seconds")
    a("--itl-slo", type=float, default=0.1, help="seconds")
    a("--sweep", help="comma-separated rates; reports goodput")
    a("--seed", type=int, default=0)
    a(
        "--prompt-seed",
        type=int,
        default=None,
        help="seeds the prompts' words (default --seed); another one sends the same workload "
        "with prompts no earlier run cached",
    )
    a(
        "--fresh-prompts",
        action="store_true",
        help="each rate of a sweep sends other prompt words than the rates before it "
        "(default: the same prompts at every rate, which the prefix cache may still hold)",
    )
    a("--json", help="write the report here")
    a(
        "--write-synthetic-csv",
        metavar="PATH",
        help="write a SYNTHETIC BurstGPT-format sample (--num-requests rows) and exit",
    )
    return p


def validate(args: argparse.Namespace) -> None:
    if not (args.num_requests or args.duration or args.trace or args.write_synthetic_csv):
        raise ValueError("bound the run: give --num-requests or --duration (or --trace)")
    for name in ("timeout", "request_timeout", "ttft_slo", "itl_slo", "time_scale"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if args.num_requests is not None and args.num_requests <= 0:
        raise ValueError("--num-requests must be > 0")
    if args.max_in_flight <= 0:
        raise ValueError("--max-in-flight must be > 0")
    parse_tenants(args.tenants)
    if not 0 <= args.long_fraction < 1:
        raise ValueError("--long-fraction must be in [0, 1)")
    if args.long_fraction and args.trace:
        raise ValueError("--long-fraction shapes the synthetic workload, not a --trace replay")
    lo, hi = long_prompts(args)["long_prompt_range"]
    if not 1 <= lo <= hi:
        raise ValueError("--long-prompt-range: 1 <= LO <= HI")
    if not 1 <= args.min_output_tokens < args.max_output_tokens:
        raise ValueError("--min-output-tokens must be in [1, --max-output-tokens)")
    if args.min_output_tokens > 1 and args.trace:
        raise ValueError("--min-output-tokens shapes the synthetic workload, not a --trace replay")
    if args.long_output_tokens < 2:
        raise ValueError("--long-output-tokens must be >= 2")
    if args.max_context is not None and args.max_context <= PROMPT_SLACK + 1:
        raise ValueError(f"--max-context must be > {PROMPT_SLACK + 1}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        validate(args)
        if args.write_synthetic_csv:
            n = args.num_requests or 3000
            arr = synthetic_workload(
                n,
                args.seed,
                rate=args.rate,
                shape=args.gamma_shape,
                scale=args.gamma_scale,
                zipf_a=args.zipf_a,
                max_prompt_tokens=args.max_prompt_tokens,
                max_output_tokens=args.max_output_tokens,
                min_output_tokens=args.min_output_tokens,
                **long_prompts(args),
            )
            rows = write_burstgpt_csv(args.write_synthetic_csv, arr, args.seed)
            print(f"wrote {rows} SYNTHETIC rows to {args.write_synthetic_csv}")
            return 0
        report = asyncio.run(main_async(args))
    except (ValueError, OSError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
