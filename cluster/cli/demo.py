"""``kvrelay demo``: a local disaggregated cluster answering a short mixed chat workload.

Starts 1 prefill + 1 decode worker (by default) on the default model, sends concurrent chat
requests through the public gRPC API, streams one of them to the terminal as it is generated,
and ends with TTFT / inter-token latency percentiles and the KV relayed from P to D.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import time
from dataclasses import dataclass, field

from kvrelay.cluster.runtime.config import config_or_exit
from kvrelay.cluster.runtime.serve import Cluster

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a short poem about autumn leaves.",
    "Explain what a black hole is in simple terms.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "What is 15 multiplied by 4?",
    "Describe a sunrise over the mountains.",
    "List four healthy breakfast ideas.",
]
LONG_CONTEXT = (
    "Here are my notes from the meeting. The team discussed the roadmap for the next quarter, "
    "including the migration of the storage layer, the new onboarding flow, hiring two more "
    "engineers, the budget for cloud spending, and a plan to reduce the time it takes to ship "
    "a release from two weeks to three days. Several people raised concerns about testing. "
)


@dataclass
class Trace:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    text: str = ""
    finish: str = ""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def _one(target: str, idx: int, max_tokens: int, echo: bool) -> Trace:
    from kvrelay.client import Client

    question = QUESTIONS[idx % len(QUESTIONS)]
    if idx % 4 == 3:  # every fourth request carries a long prompt (a burst of prefill work)
        question = LONG_CONTEXT * 3 + "Summarise these notes in one sentence."
    trace = Trace()
    start = last = time.perf_counter()
    with Client(target) as client:
        stream = client.chat([{"role": "user", "content": question}], stream=True,
                             max_tokens=max_tokens, temperature=0.0)
        if echo:
            print(f"\n> {question}\n", flush=True)
        for chunk in stream:  # type: ignore[union-attr]
            now = time.perf_counter()
            if chunk.token_ids:
                if trace.ttft is None:
                    trace.ttft = now - start
                else:
                    trace.gaps.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                last = now
                trace.tokens += len(chunk.token_ids)
            trace.text += chunk.text
            if echo and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            if chunk.finish_reason:
                trace.finish = chunk.finish_reason
    if echo:
        print("\n", flush=True)
    return trace


def run_demo(args: argparse.Namespace) -> int:
    cfg = config_or_exit(args, args.parser)
    if cfg.grpc_port == 50051 and cfg.http_port == 8000:  # do not collide with a real server
        cfg = cfg.model_copy(update={"grpc_port": 0, "http_port": 0})
    print(f"kvrelay demo: starting {cfg.prefill_workers} prefill + {cfg.decode_workers} decode "
          f"+ {cfg.colocated_workers} colocated worker(s) on the default model ...", flush=True)
    t0 = time.perf_counter()
    with Cluster.start(cfg) as cluster:
        target = f"{cfg.host}:{cluster.ports['grpc_port']}"
        print(f"cluster up in {time.perf_counter() - t0:.1f} s; gRPC {target}, "
              f"OpenAI HTTP http://{cfg.host}:{cluster.ports['http_port']}/v1; "
              f"workers {cluster.workers()}", flush=True)
        n = args.requests
        t1 = time.perf_counter()
        with cf.ThreadPoolExecutor(n) as pool:
            live = pool.submit(_one, target, 0, 64, True)
            rest = [pool.submit(_one, target, i, 48, False) for i in range(1, n)]
            traces = [live.result(timeout=600)] + [f.result(timeout=600) for f in rest]
        wall = time.perf_counter() - t1
        counters = cluster.counters()
        integrity = cluster.integrity()

    ttfts = [t.ttft for t in traces if t.ttft is not None]
    gaps = [g for t in traces for g in t.gaps]
    tokens = sum(t.tokens for t in traces)
    print(f"{'requests':<28}{n:>12}")
    print(f"{'finished':<28}{sum(bool(t.finish) for t in traces):>12}")
    print(f"{'generated tokens':<28}{tokens:>12}")
    print(f"{'throughput (tokens/s)':<28}{tokens / wall:>12.1f}")
    for name, values in (("TTFT (ms)", ttfts), ("inter-token latency (ms)", gaps)):
        print(f"{name:<28}{'p50':>6}{_pct(values, 0.5) * 1e3:>9.1f}   p90"
              f"{_pct(values, 0.9) * 1e3:>9.1f}   p99{_pct(values, 0.99) * 1e3:>9.1f}")
    print(f"{'KV handoffs P->D':<28}{counters['handoffs']:>12}")
    print(f"{'KV bytes relayed':<28}{counters['handoff_bytes']:>12,}")
    block_bytes = counters.get("block_bytes") or 0
    if block_bytes:
        print(f"{'KV blocks relayed':<28}{counters['handoff_bytes'] // block_bytes:>12}")
    leaked = {w: f["used"] for w, f in integrity.items() if f["used"]}
    print(f"{'leaked KV blocks':<28}{sum(leaked.values()):>12}")
    ok = all(t.finish for t in traces) and not leaked
    print("demo OK" if ok else "demo FAILED", flush=True)
    if ttfts:
        print(f"(median TTFT {statistics.median(ttfts) * 1e3:.0f} ms over {len(ttfts)} requests)")
    return 0 if ok else 1
