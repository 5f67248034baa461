"""PD (1 prefill + 1 decode worker) vs colocated (2 colocated workers) under a burst of long
prompts arriving while short requests decode, on a real local Ray cluster.

    .venv/bin/python benchmarks/pd_bench.py [--short 8 --short-prompt 32 --short-tokens 64]
        [--long 6 --long-prompt 1000 --long-tokens 16] [--json benchmarks/results/pd_bench.json]

Per configuration (a fresh cluster each, 1 thread and a 0.5 GB KV pool per worker, no frontends):
1. warm-up: two concurrent requests (model loaded, gloo groups created, first-call costs paid);
2. ``--short`` streams start together (distinct random prompts, greedy, EOS ignored);
3. once every short stream has ``--burst-after`` tokens, ``--long`` long prompts arrive at once;
4. every stream is read in its own thread from ``Cluster.generate``; each TokenEvent is
   timestamped on arrival. ITL samples = gaps between a short stream's successive events after
   its first, divided by the tokens the later event carries (one per event in practice).

Figures: p50/p99/max ITL of the short streams, their samples taken while the burst was being
prefilled, TTFT of the long prompts, and throughput = all generated tokens / (last finish - first
submit); PD/colocated ratios. Equal worker count (2 each) on the same 2-core machine: the
physical limits, measured in this process on one thread (each worker has one): ITL >= one
decode step = weight bytes / memory bandwidth (one large copy, read + write); makespan >= the
prompts' FLOPs (2 x params per token + causal attention) / (2 cores x one-thread fp32 matmul
FLOP/s), which bounds throughput = generated tokens / that makespan.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kvrelay.benchmarks.engine_bench import copy_bandwidth
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.model.loader_gguf import export_gguf
from kvrelay.workers.model.source import default_model_path
from kvrelay.workers.types import SamplingParams


@dataclass(slots=True)
class Stream:
    kind: str  # "short" | "long"
    submitted: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in event)
    error: str = ""

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)


@dataclass(frozen=True, slots=True)
class ConfigResult:
    name: str
    itl_ms: dict[str, float]  # short streams: p50, p99, max, mean, n
    itl_burst_ms: dict[str, float]  # the short streams' gaps that ended after the burst arrived
    itl_before_ms: dict[str, float]  # ... and before it: the no-burst step time
    long_ttft_s: dict[str, float]
    output_tokens: int
    makespan_s: float
    tokens_per_s: float
    counters: dict[str, Any]
    errors: list[str]


def pct(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"),
                "mean": float("nan"), "n": 0}
    a = np.asarray(xs, float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": float(a.mean()), "n": len(xs)}


@dataclass(frozen=True, slots=True)
class Limits:
    bandwidth_Bps: float  # one thread, read + write
    matmul_flops: float  # one thread, fp32
    weight_bytes: int
    itl_ms: float  # weight_bytes / bandwidth: the fastest decode step of one worker
    flops_per_prompt: float

    def min_makespan_s(self, prompts: int) -> float:
        return prompts * self.flops_per_prompt / (2 * self.matmul_flops)


def measure_limits(prompt_len: int) -> Limits:
    from safetensors import safe_open

    torch.set_num_threads(1)
    folder = export_gguf(default_model_path())
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    params = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as st:
            for key in st.keys():
                params += int(np.prod(st.get_slice(key).get_shape()))
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    best = min(_timed(lambda: a @ b) for _ in range(5))
    matmul = 2 * 512 * 1024 * 1024 / best
    bandwidth = copy_bandwidth(256 << 20, reps=5)
    # causal attention: QK^T and PV, 2 FLOPs per MAC, n^2/2 pairs, hidden = heads x head_dim
    attn = 2 * cfg["num_hidden_layers"] * prompt_len**2 * cfg["hidden_size"]
    # the embedding is a lookup (no FLOPs); the tied LM head runs on the last token only
    matmul_params = params - cfg["vocab_size"] * cfg["hidden_size"]
    return Limits(bandwidth, matmul, params * 4, params * 4 / bandwidth * 1e3,
                  2 * matmul_params * prompt_len + attn)


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def consume(cluster: Cluster, prompt: list[int], params: SamplingParams, s: Stream,
            progress: threading.Condition) -> None:
    s.submitted = time.perf_counter()
    try:
        for event in cluster.generate(cluster.request(prompt, params)):
            if event.token_ids:
                with progress:
                    s.arrivals.append((time.perf_counter(), len(event.token_ids)))
                    progress.notify_all()
    except Exception as exc:  # a failed stream is reported, not fatal to the run
        s.error = f"{type(exc).__name__}: {exc}"
    with progress:
        progress.notify_all()


def start(cluster: Cluster, prompts: list[list[int]], params: SamplingParams, kind: str,
          progress: threading.Condition) -> tuple[list[Stream], list[threading.Thread]]:
    streams = [Stream(kind) for _ in prompts]
    threads = [threading.Thread(target=consume, args=(cluster, p, params, s, progress),
                                daemon=True) for p, s in zip(prompts, streams, strict=True)]
    for t in threads:
        t.start()
    return streams, threads


def run_config(name: str, cfg: ServeConfig, args: argparse.Namespace) -> ConfigResult:
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:  # random ids: no prefix-cache hits between requests
        return [rng.randrange(100, 40_000) for _ in range(n)]

    greedy = dict(temperature=0.0, ignore_eos=True)
    with Cluster.start(cfg) as cluster:
        progress = threading.Condition()
        warm, wt = start(cluster, [prompt(48), prompt(48)], SamplingParams(max_tokens=4, **greedy),
                         "warm", progress)
        for t in wt:
            t.join(120)
        short, st = start(cluster, [prompt(args.short_prompt) for _ in range(args.short)],
                          SamplingParams(max_tokens=args.short_tokens, **greedy), "short", progress)
        with progress:
            ready = progress.wait_for(
                lambda: all(s.tokens >= args.burst_after or s.error for s in short), timeout=120)
        if not ready:
            raise RuntimeError(f"{name}: short streams did not start decoding within 120 s")
        t_burst = time.perf_counter()
        long, lt = start(cluster, [prompt(args.long_prompt) for _ in range(args.long)],
                         SamplingParams(max_tokens=args.long_tokens, **greedy), "long", progress)
        for t in st + lt:
            t.join(args.timeout)
        counters = cluster.counters()
    everything = short + long
    errors = [s.error for s in everything + warm if s.error]
    errors += [f"{s.kind} stream unfinished" for s in everything if s.tokens == 0]
    gaps: list[tuple[float, float]] = []  # (end time, per-token gap)
    for s in short:
        for (a, _), (b, n) in zip(s.arrivals, s.arrivals[1:], strict=False):
            gaps += [(b, (b - a) / n)] * n
    last_prefill = max((s.arrivals[0][0] for s in long if s.arrivals), default=t_burst)
    first = min(s.submitted for s in everything)
    end = max((s.arrivals[-1][0] for s in everything if s.arrivals), default=first)
    out_tokens = sum(s.tokens for s in everything)
    return ConfigResult(
        name,
        pct([g * 1e3 for _, g in gaps]),
        pct([g * 1e3 for t, g in gaps if t_burst < t <= last_prefill]),
        pct([g * 1e3 for t, g in gaps if t <= t_burst]),
        {k: v / 1e3 for k, v in pct([(s.arrivals[0][0] - s.submitted) * 1e3
                                     for s in long if s.arrivals]).items()},
        out_tokens, end - first, out_tokens / max(end - first, 1e-9), counters, errors,
    )


def render(pd: ConfigResult, co: ConfigResult, lim: Limits, l0: tuple[float, ...],
           l1: tuple[float, ...], args: argparse.Namespace, wall: float) -> str:
    def r(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "n/a"

    rows = [
        ("short ITL p50 ms", pd.itl_ms["p50"], co.itl_ms["p50"]),
        ("short ITL p99 ms", pd.itl_ms["p99"], co.itl_ms["p99"]),
        ("short ITL max ms", pd.itl_ms["max"], co.itl_ms["max"]),
        ("short ITL p50 ms, during burst prefill", pd.itl_burst_ms["p50"], co.itl_burst_ms["p50"]),
        ("short ITL p99 ms, during burst prefill", pd.itl_burst_ms["p99"], co.itl_burst_ms["p99"]),
        ("short ITL p50 ms, before burst (no-burst step)", pd.itl_before_ms["p50"],
         co.itl_before_ms["p50"]),
        ("long TTFT p50 s", pd.long_ttft_s["p50"], co.long_ttft_s["p50"]),
        ("long TTFT max s", pd.long_ttft_s["max"], co.long_ttft_s["max"]),
        ("throughput, generated tok/s", pd.tokens_per_s, co.tokens_per_s),
        ("makespan s", pd.makespan_s, co.makespan_s),
    ]
    lines = [
        f"pd_bench: SmolLM2-135M fp32, 1 thread per worker, {args.short} short streams "
        f"({args.short_prompt}-token prompts, {args.short_tokens} tokens) + burst of {args.long} "
        f"x {args.long_prompt}-token prompts ({args.long_tokens} tokens) after "
        f"{args.burst_after} short tokens",
        f"load average start {l0[0]:.2f} {l0[1]:.2f} {l0[2]:.2f}, end {l1[0]:.2f} {l1[1]:.2f} "
        f"{l1[2]:.2f}; wall {wall:.0f} s",
        "metric | PD 1P+1D | colocated x2 | PD/colocated",
        "--- | --- | --- | ---",
    ]
    lines += [f"{m} | {a:.3g} | {b:.3g} | {r(a, b)}" for m, a, b in rows]
    tput_limit = pd.output_tokens / lim.min_makespan_s(args.long)
    lines += [
        f"machine (1 thread): copy {lim.bandwidth_Bps / 1e9:.1f} GB/s read+write, fp32 matmul "
        f"{lim.matmul_flops / 1e9:.0f} GFLOP/s; weights {lim.weight_bytes / 1e6:.0f} MB",
        f"limit ITL >= {lim.itl_ms:.1f} ms (weights / bandwidth): limit/ITL p50 PD "
        f"{r(lim.itl_ms, pd.itl_ms['p50'])}, colocated {r(lim.itl_ms, co.itl_ms['p50'])}; "
        f"limit/ITL p99 PD {r(lim.itl_ms, pd.itl_ms['p99'])}, colocated "
        f"{r(lim.itl_ms, co.itl_ms['p99'])}",
        f"limit makespan >= {lim.min_makespan_s(args.long):.1f} s (burst FLOPs / 2 cores) -> "
        f"throughput <= {tput_limit:.1f} tok/s: ours/limit PD "
        f"{r(pd.tokens_per_s, tput_limit)}, colocated {r(co.tokens_per_s, tput_limit)}",
    ]
    lines.append(f"PD handoffs {pd.counters.get('handoffs')}, bytes relayed "
                 f"{pd.counters.get('handoff_bytes')}, refusals {pd.counters.get('handoff_refusals')}")
    for c in (pd, co):
        if c.errors:
            lines.append(f"{c.name} errors: {c.errors}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--short", type=int, default=8)
    a("--short-prompt", type=int, default=32)
    a("--short-tokens", type=int, default=64)
    a("--long", type=int, default=6)
    a("--long-prompt", type=int, default=1000)
    a("--long-tokens", type=int, default=16)
    a("--burst-after", type=int, default=4, help="short tokens each before the burst")
    a("--timeout", type=float, default=300.0)
    a("--seed", type=int, default=0)
    a("--json", default=None)
    args = p.parse_args(argv)
    if min(args.short, args.long, args.short_prompt, args.long_prompt) < 1 or \
            args.short_tokens <= args.burst_after or args.long_tokens < 1:
        p.error("counts and lengths >= 1, --short-tokens > --burst-after")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base = dict(grpc_port=None, http_port=None, threads_per_worker=1, kv_cache_gb=0.5)
    l0, t0 = os.getloadavg(), time.time()
    lim = measure_limits(args.long_prompt)
    pd = run_config("PD", ServeConfig(prefill_workers=1, decode_workers=1, **base), args)
    co = run_config("colocated", ServeConfig(prefill_workers=0, decode_workers=0,
                                             colocated_workers=2, **base), args)
    l1 = os.getloadavg()
    print(render(pd, co, lim, l0, l1, args, time.time() - t0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "loadavg_start": l0, "loadavg_end": l1,
                       "limits": asdict(lim), "pd": asdict(pd), "colocated": asdict(co)}, f, indent=1, default=str)
    return 0 if not (pd.errors or co.errors) else 1


if __name__ == "__main__":
    raise SystemExit(main())
