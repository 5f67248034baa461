"""Served / offline output tokens/s at saturation (issue 17: "served through ``kvrelay serve`` on
the GPU, one colocated worker owning the GPU: output tokens/s at saturation >= 0.9 of the offline
engine at the same batch").

    python benchmarks/serve_ratio.py --tokenizer DIR [--device cuda --shape 1b --dtype bfloat16]
        [--batches 32 128 --prompt 128 --max-tokens 256 --reps 3 --clients K] [--out DIR]

The model is gpu_serve.py's random-weight Llama (``make_model``, same shapes and tokenizer).
For each batch N, each side runs N requests of P random prompt tokens, greedy, ``ignore_eos``,
``max_tokens`` T, all submitted at once (``max_num_seqs`` = the largest N, prefix caching off):

* offline: our ``Engine`` (built by ``LLM`` from the same engine settings the worker gets),
  stepped on this thread; a token's time is when the ``step()`` that returned it returns;
* served: ``Cluster.start`` (what ``kvrelay serve`` runs) with ONE colocated worker owning the
  device; N concurrent streams through the public gRPC API (``AsyncClient.generate_stream``,
  our own client: its chunks carry token ids, so every token is counted and timed exactly,
  where the OpenAI HTTP stream gives text only), from a separate process so that the clients do
  not share the driver's interpreter with the frontends (``--clients K``: the streams split over
  K processes); a token's time is when its chunk reaches the client.

Timed, on both sides from the same per-token times (``window``): **e2e** = N*T / (last token -
submission), prefill included; **decode window** = tokens timed after every request has its
first token and up to the first request's last token (all N requests decoding the whole time:
batch exactly N), over that span: the saturated decode rate, the issue's figure. The ratio is
served / offline decode-window tok/s. ITL = gap between a request's consecutive token arrivals
(a chunk of k tokens counts k tokens of gap / k). Checks: the clients received N*T tokens; the
worker's engine counters moved by what the offline engine's did (decode and prompt tokens),
read from its heartbeats (multiturn_bench's ``settled_stats``). One warm-up round (T=16) per
batch on each side first (CUDA graphs, allocator). Per served rep also, to find which process
sets the rate and whether one grows from rep to rep: tokens per gRPC chunk, the Ray objects of
the controller's event stream, and the CPU time per token and resident memory of each process
of the path (worker, controller actor, driver, clients; serve_path_bench's figures), the
worker's split into its engine thread, its event sender and the rest; per offline rep, the
process's and the stepping thread's CPU per token, to hold the worker's against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ray
import torch

from kvrelay.benchmarks.gpu_serve import SHAPES, make_model
from kvrelay.benchmarks.multiturn_bench import settled_stats, stats_delta
from kvrelay.benchmarks.pd_bench import pct
from kvrelay.cluster.runtime.actors import freeze_heap, worker_engine_config
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

# per request: (arrival time, tokens in that arrival), in order
Arrivals = list[list[tuple[float, int]]]


class Window(NamedTuple):
    tokens: int
    e2e_s: float
    e2e_tok_s: float
    window_s: float  # every request decoding: [last first token, first last token]
    window_tokens: int  # tokens that arrived inside it (after its start, up to its end)
    window_tok_s: float
    itl: list[float]  # per token after each request's first: its share of the gap before it


def window(arrivals: Arrivals, t0: float) -> Window:
    """The figures of one run from its per-token arrival times; ``t0``: submission."""
    tokens = sum(n for req in arrivals for _, n in req)
    end = max(req[-1][0] for req in arrivals)
    start, stop = max(req[0][0] for req in arrivals), min(req[-1][0] for req in arrivals)
    inside = sum(n for req in arrivals for t, n in req if start < t <= stop)
    span = stop - start
    itl = [
        (b - a) / n
        for req in arrivals
        for (a, _), (b, n) in itertools.pairwise(req)
        for _ in range(n)
    ]
    return Window(
        tokens,
        end - t0,
        tokens / (end - t0),
        span,
        inside,
        inside / span if span > 0 else float("nan"),
        itl,
    )


def summary(w: Window) -> dict[str, Any]:
    ms = [1e3 * x for x in w.itl]
    return {
        "tokens": w.tokens,
        "e2e_s": w.e2e_s,
        "e2e_tok_s": w.e2e_tok_s,
        "window_s": w.window_s,
        "window_tokens": w.window_tokens,
        "window_tok_s": w.window_tok_s,
        "itl_ms": {k: v for k, v in pct(ms).items() if k in ("p50", "p99", "mean")},
    }


def serve_config(args: argparse.Namespace) -> ServeConfig:
    cpu = args.device == "cpu"
    return ServeConfig(
        model=str(args.model_dir),
        device=args.device,
        dtype=args.dtype,
        kv_cache_gb=args.kv_cache_gb,
        grpc_port=0,
        http_port=None,
        prefill_workers=0,
        decode_workers=0,
        colocated_workers=1,
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.max_batched_tokens,
        enable_prefix_caching=False,
        threads_per_worker=1 if cpu else None,
        max_concurrent_streams=max(256, max(args.batches)),
    )


def prompts(n: int, length: int, seed: int, vocab: int = 49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def offline_run(llm: LLM, batch: list[list[int]], max_tokens: int) -> tuple[Arrivals, float]:
    eng = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    index: dict[str, int] = {}
    arrivals: Arrivals = [[] for _ in batch]
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        rid = f"off-{t0}-{i}"
        index[rid] = i
        eng.add_request(rid, p, params)
    while eng.has_unfinished():
        events = eng.step()
        now = time.perf_counter()
        for ev in events:
            if ev.token_ids:
                arrivals[index[ev.request_id]].append((now, len(ev.token_ids)))
    return arrivals, t0


def offline(args: argparse.Namespace, cfg: ServeConfig) -> dict[int, list[dict[str, Any]]]:
    dtype = getattr(torch, args.dtype)
    llm = LLM(
        str(args.model_dir),
        engine_config=worker_engine_config(cfg),
        dtype=dtype,
        device=args.device,
        threads=cfg.threads_per_worker,
    )
    freeze_heap()  # as a served worker does once its engine is up
    out: dict[int, list[dict[str, Any]]] = {}
    for n in args.batches:
        offline_run(llm, prompts(n, args.prompt, seed=n, vocab=args.vocab), 16)  # warm-up
        out[n] = []
        for r in range(args.reps):
            s0 = llm.engine.stats()
            c0, e0 = cpu_s({"p": os.getpid()})["p"], time.thread_time()
            batch = prompts(n, args.prompt, seed=1000 + r, vocab=args.vocab)
            arrivals, t0 = offline_run(llm, batch, args.max_tokens)
            c1, e1 = cpu_s({"p": os.getpid()})["p"], time.thread_time()
            s1 = llm.engine.stats()
            row = summary(window(arrivals, t0))
            row["engine"] = {
                k: getattr(s1, k) - getattr(s0, k)
                for k in ("decode_tokens_computed", "prompt_tokens_computed")
            }
            # the served worker's figures to hold these against: its process, its engine thread
            row["cpu_us_per_token"] = {
                "process": 1e6 * (c1 - c0) / row["tokens"],
                "engine_thread": 1e6 * (e1 - e0) / row["tokens"],
            }
            out[n].append(row)
            print(f"offline N={n} rep {r}: {brief(row)}", flush=True)
            cpu = row["cpu_us_per_token"]
            print(
                f"  CPU us/token: process {cpu['process']:.1f}, engine thread "
                f"{cpu['engine_thread']:.1f}",
                flush=True,
            )
    del llm
    gc.unfreeze()  # the engine's objects in cycles, frozen above, go too (its device memory)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


async def _streams(
    port: int, batch: list[list[int]], max_tokens: int
) -> tuple[Arrivals, float, list[int]]:
    from kvrelay.client import AsyncClient

    async with AsyncClient(f"127.0.0.1:{port}", timeout=600) as client:
        await client.models()  # the channel is up before the clock starts

        async def one(p: list[int], got: list[tuple[float, int]]) -> int:
            usage = 0
            async for chunk in client.generate_stream(
                token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ):
                if chunk.token_ids:
                    got.append((time.perf_counter(), len(chunk.token_ids)))
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return usage

        arrivals: Arrivals = [[] for _ in batch]
        t0 = time.perf_counter()
        usage = await asyncio.gather(*(one(p, a) for p, a in zip(batch, arrivals, strict=True)))
    return arrivals, t0, list(usage)


def stream_load(
    port: int, batch: list[list[int]], max_tokens: int
) -> tuple[Arrivals, float, list[int]]:
    """N concurrent gRPC streams, run in the client process (its heap frozen first, as the
    cluster's processes freeze theirs: a full collection there would stall the arrivals)."""
    freeze_heap()
    return asyncio.run(_streams(port, batch, max_tokens))


def spread_load(
    pools: Sequence[Any], port: int, batch: list[list[int]], max_tokens: int
) -> tuple[Arrivals, float, list[int]]:
    """``stream_load`` with the batch split into contiguous parts, one a client process, run
    at once; arrivals and usage in the batch's order, t0 the earliest submission (perf_counter
    is the system's monotonic clock, the same in every process)."""
    k = len(pools)
    parts = [batch[i * len(batch) // k : (i + 1) * len(batch) // k] for i in range(k)]
    runs = [
        pool.apply_async(stream_load, (port, part, max_tokens))
        for pool, part in zip(pools, parts, strict=True)
    ]
    done = [run.get() for run in runs]
    arrivals = [req for a, _, _ in done for req in a]
    usage = [u for _, _, us in done for u in us]
    return arrivals, min(t0 for _, t0, _ in done), usage


def path_pids(cluster: Cluster, pools: Sequence[Any]) -> dict[str, int]:
    """The processes of the served path: its one worker, the controller actor, the driver
    (frontends, this process) and the clients' (each pool's one process: ``client``, or
    ``client0``, ``client1``, ... when there are several)."""
    [wid] = cluster.workers()
    clients = [pool.apply(os.getpid) for pool in pools]
    return {
        "worker": cluster.call("worker_pid", wid),
        "controller": ray.get(cluster.controller.__ray_call__.remote(lambda _: os.getpid())),
        "driver": os.getpid(),
        **(
            {"client": clients[0]}
            if len(clients) == 1
            else {f"client{i}": c for i, c in enumerate(clients)}
        ),
    }


def cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) each process has spent so far (Linux /proc:
    no psutil on the GPU machine)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        # fields after the command's closing parenthesis: utime and stime are the 12th and 13th
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads so far, summed by the name the OS
    shows (Linux /proc; a worker names its engine thread ``kvrelay-engine`` and its event
    sender ``kvrelay-events``; its other threads keep the process's name or Ray's)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def worker_threads(
    before: dict[str, float], after: dict[str, float], tokens: int
) -> dict[str, float]:
    """A worker's CPU per token: its engine thread, its event sender, everything else."""
    moved = {k: 1e6 * (v - before.get(k, 0.0)) / tokens for k, v in after.items()}
    engine = moved.pop("kvrelay-engine", 0.0)
    sender = moved.pop("kvrelay-events", 0.0)
    return {"engine": engine, "sender": sender, "other": sum(moved.values())}


def path_counts(cluster: Cluster) -> dict[str, int]:
    """Counters of the path's messages so far: the worker's ``on_events`` calls received by
    the controller and their tokens, the event stream's Ray objects received by the driver,
    and the driver's Ray calls to the controller by method."""
    counters = cluster.call("counters")
    fronts = cluster.frontends
    return {
        "event_deliveries": counters["event_deliveries"],
        "event_tokens": counters["event_tokens"],
        "stream_objects": fronts.event_batches() if fronts else 0,
        **{f"driver_calls.{k}": v for k, v in (fronts.backend_calls() if fronts else {}).items()},
    }


def count_line(
    before: dict[str, int], after: dict[str, int], tokens: int, chunks: int, requests: int
) -> tuple[dict[str, float], str]:
    """Per token, what crossed each hop during a rep (counted): worker -> controller Ray calls,
    controller -> driver stream objects, driver -> client gRPC messages; and the driver's Ray
    calls to the controller per request, by method."""
    moved = {k: after[k] - before.get(k, 0) for k in after}
    per_token = {
        "ray_calls_worker_to_controller": moved["event_deliveries"] / tokens,
        "stream_objects": moved["stream_objects"] / tokens,
        "grpc_messages": chunks / tokens,
    }
    calls = {
        k.split(".", 1)[1]: v / requests
        for k, v in sorted(moved.items())
        if k.startswith("driver_calls.") and v
    }
    line = (
        f"  per token: {per_token['ray_calls_worker_to_controller']:.4f} on_events calls "
        f"({moved['event_tokens'] / max(1, moved['event_deliveries']):.1f} tokens a call), "
        f"{per_token['stream_objects']:.4f} stream objects, {per_token['grpc_messages']:.3f} "
        f"gRPC messages; driver->controller calls a request: "
        + ", ".join(f"{k} {v:.2f}" for k, v in calls.items())
    )
    return per_token | {f"calls_per_request.{k}": v for k, v in calls.items()}, line


def rss_mb(pids: dict[str, int]) -> dict[str, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    return {
        name: int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page >> 20
        for name, pid in pids.items()
    }


def served(
    args: argparse.Namespace, cfg: ServeConfig, pools: Sequence[Any]
) -> tuple[dict[int, list[dict[str, Any]]], dict[str, str]]:
    out: dict[int, list[dict[str, Any]]] = {}
    with Cluster.start(cfg) as cluster:
        devices = cluster.call("worker_devices")
        port = cluster.ports["grpc_port"]
        pids = path_pids(cluster, pools)
        for n in args.batches:
            warm = prompts(n, args.prompt, seed=n, vocab=args.vocab)
            spread_load(pools, port, warm, 16)  # warm-up
            out[n] = []
            for r in range(args.reps):
                before, c0 = settled_stats(cluster), cpu_s(pids)
                w0 = thread_cpu_s(pids["worker"])
                counts0 = path_counts(cluster)
                batch = prompts(n, args.prompt, seed=1000 + r, vocab=args.vocab)
                arrivals, t0, usage = spread_load(pools, port, batch, args.max_tokens)
                c1 = cpu_s(pids)
                w1 = thread_cpu_s(pids["worker"])
                counts1 = path_counts(cluster)
                objects = counts1["stream_objects"] - counts0["stream_objects"]
                moved = stats_delta(settled_stats(cluster), before)
                row = summary(window(arrivals, t0))
                row["usage_tokens"] = sum(usage)
                [d] = moved.values()  # one worker
                row["engine"] = {
                    k: d[k] for k in ("decode_tokens_computed", "prompt_tokens_computed")
                }
                # where the path's time goes (the slowest process sets the rate) and whether
                # a process grows from rep to rep
                row["tokens_per_chunk"] = row["tokens"] / sum(len(a) for a in arrivals)
                row["stream_objects"] = objects
                row["cpu_us_per_token"] = {p: 1e6 * (c1[p] - c0[p]) / row["tokens"] for p in pids}
                row["worker_threads_cpu_us_per_token"] = worker_threads(w0, w1, row["tokens"])
                row["rss_mb"] = rss_mb(pids)
                row["per_token"], counted = count_line(
                    counts0, counts1, row["tokens"], sum(map(len, arrivals)), n
                )
                out[n].append(row)
                print(f"served N={n} rep {r}: {brief(row)}", flush=True)
                cpu = " ".join(f"{p} {v:.1f}" for p, v in row["cpu_us_per_token"].items())
                print(
                    f"  {row['tokens_per_chunk']:.2f} tokens/chunk, {objects} stream objects; "
                    f"CPU us/token: {cpu}; RSS MB {row['rss_mb']}",
                    flush=True,
                )
                split = row["worker_threads_cpu_us_per_token"]
                print(
                    "  worker threads, CPU us/token: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in split.items()),
                    flush=True,
                )
                print(counted, flush=True)
        assert not cluster.call("debug_flights"), "requests left in flight"
    return out, devices


def brief(row: dict[str, Any]) -> str:
    return (
        f"window {row['window_tok_s']:.1f} tok/s ({row['window_tokens']} tokens in "
        f"{row['window_s']:.3f} s), e2e {row['e2e_tok_s']:.1f} tok/s, ITL p50 "
        f"{row['itl_ms']['p50']:.2f} p99 {row['itl_ms']['p99']:.2f} ms, "
        f"engine {row['engine']}"
    )


def report(
    args: argparse.Namespace,
    off: dict[int, list[dict[str, Any]]],
    srv: dict[int, list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    rows, ok = [], True
    for n in args.batches:
        for r, (o, s) in enumerate(zip(off[n], srv[n], strict=True)):
            # every token reached the clients; the worker computed what the offline engine did
            counted = (
                s["tokens"] == s["usage_tokens"] == o["tokens"] == n * args.max_tokens
                and s["engine"] == o["engine"]
            )
            ok = ok and counted
            rows.append(
                {
                    "batch": n,
                    "rep": r,
                    "offline_tok_s": o["window_tok_s"],
                    "served_tok_s": s["window_tok_s"],
                    "ratio": s["window_tok_s"] / o["window_tok_s"],
                    "offline_e2e_tok_s": o["e2e_tok_s"],
                    "served_e2e_tok_s": s["e2e_tok_s"],
                    "e2e_ratio": s["e2e_tok_s"] / o["e2e_tok_s"],
                    "offline_itl_ms": o["itl_ms"],
                    "served_itl_ms": s["itl_ms"],
                    "counters_agree": counted,
                }
            )
    print(
        f"\n## served / offline output tok/s, {args.shape} {args.dtype} on {args.device}, "
        f"P={args.prompt} T={args.max_tokens} (goal: ratio >= 0.9)"
    )
    print(
        " batch | rep | offline tok/s | served tok/s | ratio | e2e ratio | offline ITL p50/p99 ms"
        " | served ITL p50/p99 ms | counters"
    )
    for x in rows:
        oi, si = x["offline_itl_ms"], x["served_itl_ms"]
        print(
            f" {x['batch']:5d} | {x['rep']:3d} | {x['offline_tok_s']:13.1f} | "
            f"{x['served_tok_s']:12.1f} | {x['ratio']:5.2f} | {x['e2e_ratio']:9.2f} | "
            f"{oi['p50']:8.2f} / {oi['p99']:8.2f}    | {si['p50']:8.2f} / {si['p99']:8.2f}   | "
            f"{'ok' if x['counters_agree'] else 'MISMATCH'}"
        )
    # the sides run one after the other (offline reps, then served reps), so a rep's pairing is
    # arbitrary: the figure is median served / median offline, beside the per-rep spread
    medians = []
    for n in args.batches:
        mine = [x for x in rows if x["batch"] == n]
        off_med = statistics.median(x["offline_tok_s"] for x in mine)
        srv_med = statistics.median(x["served_tok_s"] for x in mine)
        ratios = [x["ratio"] for x in mine]
        medians.append(
            {
                "batch": n,
                "offline_tok_s": off_med,
                "served_tok_s": srv_med,
                "ratio": srv_med / off_med,
            }
        )
        print(
            f" N={n}: median offline {off_med:.1f} tok/s, served {srv_med:.1f} tok/s, "
            f"ratio {srv_med / off_med:.3f} (per rep {min(ratios):.3f}-{max(ratios):.3f}, "
            f"{len(ratios)} reps)"
        )
    return rows, medians, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float32"),
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per request (P)")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens per request (T)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="default: 4 cuda, 0.25 cpu")
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument(
        "--clients",
        type=int,
        default=1,
        help="client processes the served side's streams are split over (one Python gRPC "
        "client receiving ~50k tokens/s may itself set the rate)",
    )
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.kv_cache_gb = args.kv_cache_gb or (4.0 if cuda else 0.25)
    args.vocab = SHAPES[args.shape].get("vocab_size", 49152)  # micro: 512 ids (make_model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model_dir = make_model(
        Path(f"/tmp/kvrelay-{args.shape}-{args.dtype}"),
        Path(args.tokenizer),
        getattr(torch, args.dtype),
        args.shape,
        args.device,
    )
    print(f"load average at start: {os.getloadavg()}", flush=True)
    cfg = serve_config(args)
    off = offline(args, cfg)
    # the clients' processes, started before Ray so that they fork nothing of it
    with contextlib.ExitStack() as stack:
        spawn = multiprocessing.get_context("spawn")
        pools = [stack.enter_context(spawn.Pool(1)) for _ in range(args.clients)]
        srv, devices = served(args, cfg, pools)
    rows, medians, ok = report(args, off, srv)
    print(f"worker devices: {devices}; load average at end: {os.getloadavg()}", flush=True)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "worker_devices": devices,
        "medians": medians,
        "rows": rows,
        "offline": off,
        "served": srv,
    }
    (out / "serve_ratio.json").write_text(json.dumps(result, indent=1))
    print("counters", "AGREE" if ok else "DISAGREE", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
